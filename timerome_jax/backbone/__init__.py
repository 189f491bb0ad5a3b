"""The frozen model: config, the pure forward over stacked layers, interventions as data, tokenizers,
and loading/saving of HF and Orbax checkpoints."""
