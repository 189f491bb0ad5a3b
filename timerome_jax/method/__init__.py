"""TimeROME-DLM itself: facts, the diffusion-time trace (TIE), coordinate selection, capture and the
closed-form edit memory."""
