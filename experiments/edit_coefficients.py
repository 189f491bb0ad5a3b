"""Why the edit is not selective on the packaged model: the Eq. 12 coefficients G U h on forget
vs retain tokens.

    python experiments/edit_coefficients.py timerome_jax/assets/tofu_target

For the memory of all 40 forget01 facts at resid layers 1 and 3 (alpha 1, dense), prints the mean
norm and max |c| of the coefficient vector on the forget facts' subject/object tokens and on 40
retain_perturbed questions' subject/object tokens, the own-fact coefficient of each forget fact on
its own subject tokens, and the mean norms of the keys u and deltas d.
"""
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timerome_jax.method import facts as F
from timerome_jax import pipeline as pl
from timerome_jax.tofu import data as tofu
from timerome_jax.backbone.checkpoint import load_model
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.method.trace import Coordinate
from timerome_jax.backbone.model import run
params, cfg, tok = load_model(sys.argv[1])
ff = F.load_facts(tok, 'forget01', tok.eos_id)
rr = F.make_facts(tok, tofu.load_split('retain_perturbed')[:40], tok.eos_id)
for layer in [1,3]:
    mem, info = pl.install(params, cfg, tok, ff, Coordinate(layer,-1,0), alpha=1.0, q=0)
    def coefs(facts):
        cb = F.cloze_batch(facts, tok, cfg, "I don't know.")
        T = cb.tokens_o.shape[1]
        acts = run(params, cb.tokens_o, cfg, cb.pad_o, Intervene(read_pos=jnp.broadcast_to(jnp.arange(T), cb.tokens_o.shape)), stop_layer=layer).acts['resid'][layer]
        c = np.asarray(mem.coefficients(acts))  # [N,T,C]
        sp = np.asarray(cb.subj_pos); sv=np.asarray(cb.subj_valid); op=np.asarray(cb.obj_pos); ov=np.asarray(cb.obj_valid)
        subj = np.concatenate([c[i, sp[i][sv[i]]] for i in range(len(facts))])
        obj = np.concatenate([c[i, op[i][ov[i]]] for i in range(len(facts))])
        own = [np.abs(c[i, sp[i][sv[i]], i]).mean() for i in range(len(facts))] if facts is ff else None
        return subj, obj, own
    fs, fo, own = coefs(ff); rs, ro, _ = coefs(rr)
    nrm = lambda x: np.sqrt((x**2).sum(-1)).mean()
    print('layer', layer, 'lam', round(info['lam'],1), '| ||c|| forget subj %.3f obj %.3f | retain subj %.3f obj %.3f | own-fact |c| on its subject %.3f' % (nrm(fs), nrm(fo), nrm(rs), nrm(ro), np.mean(own)))
    print('   max|c| forget subj %.3f retain subj %.3f retain obj %.3f' % (np.abs(fs).max(-1).mean(), np.abs(rs).max(-1).mean(), np.abs(ro).max(-1).mean()))
    dn = np.linalg.norm(np.asarray(mem.Dm[:40]),axis=1).mean(); un=np.linalg.norm(np.asarray(mem.U[:40]),axis=1).mean()
    print('   |d| %.2f |u| %.2f' % (dn, un))
