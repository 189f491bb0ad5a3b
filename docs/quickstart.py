"""Quick start: trace, select, edit, generate and evaluate through the public API (runs in seconds
on a CPU with the packaged 6-layer TOFU model; tests/test_api.py runs this file as written)."""
import timerome_jax as tj

params, cfg, tok = tj.load_model(tj.DEFAULT_MODEL)  # or any LLaDA/Dream/... HF folder
facts = tj.load_facts(tok, "forget01", tok.eos_id)  # the 40 TOFU facts to forget

# Stages 1-2: diffusion-time causal tracing (TIE) on a few facts, then pick (layer, step, module)
traced = [f for f in facts if f.key_source == "subject"][:2]
result = tj.trace_facts(params, cfg, traced, tj.TraceConfig(steps=2, n_noise=1), progress=False)
coord, score = tj.select(result.tie_bar)
print("edit at", coord)

# Stage 3: the closed-form edit memory for all 40 facts, installed as data
memory, info = tj.install(params, cfg, tok, facts, coord, alpha=0.5, q=2)
edited = tj.Intervene(edit=memory)

prompt = tj.format_prompt(facts[0].question)
scfg = tj.SamplerConfig(steps=8, block_length=16)
print("before:", tj.generate_text(params, cfg, tok, [prompt], 16, scfg)[0])
print("after: ", tj.generate_text(params, cfg, tok, [prompt], 16, scfg, intervene=edited)[0])

# TOFU metrics without and with the edit, then a comparison with CIs and paired tests
kw = dict(metrics=("forget_lp", "retain_lp"), n_mc=2, limit=2, progress=False)
results = {"no_edit": tj.evaluate(params, cfg, tok, "forget01", **kw),
           "timerome": tj.evaluate(params, cfg, tok, "forget01", intervene=edited, **kw)}
print(tj.markdown_table(tj.compare(results), reference="no_edit"))
