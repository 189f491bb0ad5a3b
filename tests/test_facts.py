"""method/facts.py: TOFU rows -> facts, subject key positions and the question-token fallback."""
import pytest

from timerome_jax.backbone.tokenizer import load_tokenizer
from timerome_jax.method import facts as F
from timerome_jax.tofu.models import DEFAULT_MODEL


def test_facts_keys_and_fallback():
    tok = load_tokenizer(str(DEFAULT_MODEL))  # the packaged model's tokenizer, as the demo uses
    facts = F.load_facts(tok, "forget01", tok.eos_id)
    assert len(facts) == 40
    by_src = {f.key_source for f in facts}
    assert by_src == {"subject", "question"}  # 38 name the author, 2 fall back to the question tokens
    assert sum(f.key_source == "subject" for f in facts) == 38
    for f in facts:
        decoded = tok.decode([f.prompt_ids[i] for i in f.key_pos]).strip()
        want = f.subject if f.key_source == "subject" else f.question
        assert want.startswith(decoded[:3]) or decoded in want
        assert f.object_ids[-1] == tok.eos_id
    with pytest.raises(ValueError, match="empty"):
        F.make_facts(tok, [], tok.eos_id)
