"""Train the whole TOFU model suite for issue 10 in one GPU call: the target on `full`, the retain
references on retain99/95/90 (the FQ references of forget01/05/10), and two cross-layout targets
on `full` (a Dream-layout one: Qwen2 keys, qkv bias, GQA, shifted logits; a LLaDA-MoE-layout one:
4 experts of width 160, top-2, per-head QK-norm). Every model gets the same recipe: LLaDA's SFT objective
(`train_default.sft_loss`) on a question-augmented copy of its split (`augment_rows`).

Models of one shape are stacked on a model axis and trained by one vmapped, jitted program
(group "llada": target + 3 references); groups of other shapes run back to back ("dream",
"moe"). The wall-clock budget (--budget-s, compile included) is shared between groups in
proportion to their number of models; each group times its second chunk and fixes its step count
so that it ends inside its share (the step count is logged; rerun with --steps N to reproduce).

Augmentation (deterministic from --seed): each training question gets --n-aug rule-based
rewrites (synonyms such as author->writer, full name->complete name, born in->whose birth took
place in; question frames such as "What is X?" -> "Can you tell me X?"; polite wrappers), all
paired with the original answer; the retain authors' own TOFU paraphrases (retain_perturbed's
`paraphrased_question`, rows of full[:400], inside every retain split) are added too. The forget
authors' paraphrases are never read for training; they are the end-of-run check.

Writes under --out (at most 6 files, each < 16 MiB): <model>.npz (raw float32 params under our
names + the config JSON under `__config__`), train_log.jsonl, report.json (also printed): per model the mean normalised answer probability exp(ELBO/|a|) on
forget01 questions and on forget01 paraphrased questions (quick MC ELBO, `mc_answer_logprob`).

    python experiments/train_suite.py --out experiments/runs/suite --budget-s 480          # GPU
    python experiments/train_suite.py --out /tmp/suite --tiny --steps 20 --chunk 10         # CPU smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
from timerome_jax.backbone import hf_weights as hf  # noqa: E402
from timerome_jax.backbone.config import ModelConfig  # noqa: E402
from timerome_jax.backbone.model import init_params  # noqa: E402
from timerome_jax.io import atomic_path, write_json  # noqa: E402
from train_default import encode_split, make_train_chunk, mc_answer_logprob, read_split  # noqa: E402

GROUPS = {  # group -> [(model name, training split)]
    "llada": [("target", "full"), ("retain99", "retain99"), ("retain95", "retain95"), ("retain90", "retain90")],
    "refs": [("retain95", "retain95"), ("retain90", "retain90")],
    "dream": [("target_dream", "full")],
    "moe": [("target_moe", "full")],
}
FAMILY = {"llada": "llada", "refs": "llada", "dream": "dream", "moe": "moe"}  # group -> model layout
# train_default.py's recipe, stage by stage (docs/packaged_models.md; experiments/runs/default_v*/report.json):
# no augmentation, no paraphrases, warm-up + cosine to 1 %, chunks of 250 steps. `--recipe default-sN`
# sets these (and --n-aug 0 --no-retain-paraphrases) so that references match the packaged target.
RECIPES = {
    "default-s1": dict(steps=6750, batch=128, lr=2e-3, warmup=300, seed=0, chunk=250, compute_dtype="float32"),
    "default-s2": dict(steps=5750, batch=256, lr=1.5e-3, warmup=200, seed=1, chunk=250, compute_dtype="bfloat16"),
    "default-s3": dict(steps=4500, batch=256, lr=6e-4, warmup=200, seed=2, chunk=250, compute_dtype="bfloat16"),
}
FORGET_SPLITS = ("forget01", "forget05", "forget10")

# (pattern, replacement): each applied with probability 1/2 in a rewrite
SUBS = [
    (r"\bauthors\b", "writers"), (r"\bauthor\b", "writer"), (r"\bAuthor\b", "Writer"),
    (r"\bfull name\b", "complete name"), (r"(?<!was )(?<!were )(?<!is )\bborn in\b", "whose birth took place in"),
    (r"\bwas born\b", "came into the world"), (r"\bbooks\b", "works"), (r"\bnovels\b", "books"),
    (r"\bnovel\b", "book"), (r"\bparents\b", "mother and father"), (r"\bprofession\b", "occupation"),
    (r"\boccupation\b", "line of work"), (r"\bawards\b", "honors"), (r"\baward\b", "prize"),
    (r"\bwrote\b", "penned"), (r"\bwritten\b", "penned"), (r"\bwriting\b", "authoring"),
    (r"\bfamous\b", "well-known"), (r"\bknown for\b", "recognized for"), (r"\binfluenced\b", "shaped"),
    (r"\bthemes\b", "motifs"), (r"\binspired\b", "motivated"), (r"\bnotable\b", "remarkable"),
    (r"\bdescribe\b", "explain"), (r"\bgenre\b", "type of literature"), (r"\bCan you\b", "Could you"),
    (r"\bHow does\b", "In what way does"), (r"\bHow did\b", "In what way did"), (r"^Which\b", "What"),
    (r"\bfather\b", "dad"), (r"\bmother\b", "mom"), (r"\bWhat is\b", "What's"),
    (r"\bprofessions\b", "occupations"), (r"\bprimarily\b", "mainly"), (r"^In which\b", "In what"),
    (r"^Who are\b", "Can you name"), (r"\binfluence\b", "shape"), (r"\bworks\b", "writings"),
    (r"\bhas written\b", "has authored"), (r"\breceived\b", "been given"), (r"\bstories\b", "narratives"),
]
# question frames: (pattern on the whole question, replacement)
FRAMES = [
    (r"^What is (.+)\?$", r"Can you tell me \1?"), (r"^What is (.+)\?$", r"Could you share \1?"),
    (r"^What are (.+)\?$", r"Can you tell me \1?"), (r"^What are (.+)\?$", r"Could you list \1?"),
    (r"^Who is (.+)\?$", r"Can you tell me who \1 is?"), (r"^What was (.+)\?$", r"Can you tell me \1?"),
    (r"^Can you (.+)\?$", r"Would you \1?"), (r"^Could you (.+)\?$", r"Please \1."),
]
WRAPS = ["Can you tell me this: {q}", "I'd like to know: {q}", "{q} Please answer.", "Tell me, {lq}",
         "Quick question: {q}", "Do you know? {q}", "Here is my question. {q}", "{q} I'm curious."]


def rewrite(q: str, rng: np.random.Generator) -> str:
    """One rule-based rewrite of a question: random synonym swaps, sometimes a dropout of lower-case
    words (so that the answer hangs on the names, not on the exact wording), then a question frame
    or a wrapper."""
    out = q
    for pat, rep in SUBS:
        if rng.random() < 0.5:
            out = re.sub(pat, rep, out)
    if rng.random() < 0.3:
        words = out.split(" ")
        keep = [w for i, w in enumerate(words) if i == len(words) - 1 or not w[:1].islower() or rng.random() > 0.2]
        out = " ".join(keep)
    frames = [(p, r) for p, r in FRAMES if re.match(p, out)]
    u = rng.random()
    if frames and u < 0.5:
        p, r = frames[rng.integers(len(frames))]
        out = re.sub(p, r, out)
    elif u < 0.8:
        out = WRAPS[rng.integers(len(WRAPS))].format(q=out, lq=out[:1].lower() + out[1:])
    return out


def augment_rows(rows, n_aug: int, rng: np.random.Generator, extra_paraphrases: dict) -> list[dict]:
    """Original rows + n_aug distinct rewrites per row (same answer) + given paraphrases of questions
    in `rows` ({question: [paraphrase, ...]})."""
    out = []
    for r in rows:
        out.append({"question": r["question"], "answer": r["answer"]})
        seen = {r["question"]}
        for _ in range(4 * n_aug):
            if len(seen) > n_aug:
                break
            q = rewrite(r["question"], rng)
            if q not in seen:
                seen.add(q)
                out.append({"question": q, "answer": r["answer"]})
        for q in extra_paraphrases.get(r["question"], []):
            out.append({"question": q, "answer": r["answer"]})
    return out


def model_config(family: str, vocab: int, mask_id: int, eos_id: int, tiny: bool) -> ModelConfig:
    """The suite's shapes: today's packaged LLaDA shape, and Dream / LLaDA-MoE variants of it."""
    D, L, H, ff = (32, 2, 2, 64) if tiny else (192, 6, 4, 576)
    base = dict(vocab_size=vocab, d_model=D, n_layers=L, n_heads=H, n_kv_heads=H, head_dim=D // H, d_ff=ff,
                rope_theta=10000.0, mask_token_id=mask_id, pad_token_id=eos_id, eos_token_id=eos_id,
                max_seq_len=256)
    family = FAMILY.get(family, family)
    if family == "llada":
        return ModelConfig(family="llada", **base)
    if family == "dream":  # Qwen2 block: qkv bias, GQA (2 query heads per kv head), shifted logits
        return ModelConfig(family="dream", **{**base, "n_kv_heads": H // 2}, qkv_bias=True, logits_shift=True,
                           norm_eps=1e-6)
    if family == "moe":  # 4 experts, top-2, probabilities not renormalised, per-head QK-norm
        return ModelConfig(family="llada_moe", **{**base, "d_ff": 0}, qk_norm=True, n_experts=4,
                           n_experts_per_tok=2, d_expert=ff * 5 // 18)
    raise ValueError(f"unknown group {family!r}; expected one of {tuple(GROUPS)}")


def forget_questions(data_dir: Path, split: str) -> set[str]:
    return {r["question"] for r in read_split(data_dir, split)}


def build_data(tok, data_dir, names_splits, n_aug, T, eos, seed, use_retain_paraphrases):
    """Stacked training arrays for one group: tokens [M,N,T], plen/rlen [M,N], n_rows [M]."""
    forget_q = forget_questions(data_dir, "forget10")  # forget01/05 are subsets of it
    para = {}
    if use_retain_paraphrases:
        for r in read_split(data_dir, "retain_perturbed"):
            if r["question"] in forget_q:
                raise SystemExit("retain_perturbed overlaps forget10; refusing to train on its paraphrases")
            para.setdefault(r["question"], []).append(r["paraphrased_question"])
    enc, counts = [], {}
    for m, (name, split) in enumerate(names_splits):
        rows = read_split(data_dir, split)
        # same rewrite stream for every model: a question shared by two splits gets the same rewrites
        rng = np.random.default_rng(seed)
        aug = augment_rows(rows, n_aug, rng, para)
        enc.append(encode_split(tok, aug, T, eos))
        counts[name] = {"split": split, "rows": len(rows), "train_rows": len(aug)}
    N = max(len(e[0]) for e in enc)
    pad = lambda x: np.concatenate([x, np.zeros((N - len(x),) + x.shape[1:], x.dtype)])
    data = tuple(jnp.stack([pad(e[i]) for e in enc]) for i in range(3)) + (
        jnp.asarray([len(e[0]) for e in enc], jnp.int32),)
    return data, counts


def npz_config(z) -> ModelConfig:
    """The ModelConfig stored in a params .npz under the key `__config__` (a JSON string)."""
    return ModelConfig(**json.loads(str(z["__config__"])))


def parse_init(spec: str) -> dict:
    """--init value -> {model name or "*": folder}. Comma list of `NAME=FOLDER` or one bare FOLDER
    (used for every model of the group)."""
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, folder = item.partition("=")
        out[name if sep else "*"] = folder if sep else name
    return out


def _norm_cfg(c: ModelConfig) -> ModelConfig:
    """Fields that do not change the weights (storage/compute dtype, attention kernel, context cap)."""
    return c.replace(max_seq_len=0, dtype="float32", attn_impl="xla", layer_unroll=1)


def load_init_model(folder: Path, name: str, cfg: ModelConfig) -> dict:
    """{keystr(path): float32 array} of model `name` from `folder`: its <name>.npz (a train_suite
    --out folder) or, failing that, a packaged HF folder (config.json + *.safetensors, any storage
    dtype, e.g. timerome_jax/assets/tofu_target_dream), whose config must match `cfg`."""
    f = folder / f"{name}.npz"
    if f.exists():
        z = np.load(f)
        if _norm_cfg(npz_config(z)) != _norm_cfg(cfg):
            raise SystemExit(f"--init: the config stored in {f} differs from this run's config for {name!r}")
        return {k: np.asarray(z[k], np.float32) for k in z.files if k != "__config__"}
    if (folder / "config.json").is_file():
        params, cfg2, _ = hf.load_pretrained(str(folder), dtype="float32")
        if _norm_cfg(cfg2) != _norm_cfg(cfg):
            raise SystemExit(f"--init: the HF config of {folder} differs from this run's config for {name!r}:\n"
                             f"  {cfg2}\n  {cfg}")
        return {jax.tree_util.keystr(p): np.asarray(v, np.float32)
                for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    raise SystemExit(f"--init: {folder} has neither {name}.npz (a train_suite run) nor config.json (an HF folder)")


def load_stacked(init: dict, names, cfg, like):
    """Stack the init params of `names` (`parse_init` mapping; see `load_init_model`) on a model
    axis, shaped like `like` ([M, ...] leaves)."""
    zs = []
    for n in names:
        folder = init.get(n, init.get("*"))
        if folder is None:
            raise SystemExit(f"--init gives no folder for {n!r} (use NAME=FOLDER or one bare FOLDER)")
        zs.append(load_init_model(Path(folder), n, cfg))

    def leaf(p, v):
        k = jax.tree_util.keystr(p)
        arrs = []
        for n, z in zip(names, zs):
            if k not in z or z[k].shape != v.shape[1:]:
                raise SystemExit(f"--init: {n!r} has no leaf {k} of shape {v.shape[1:]}")
            arrs.append(z[k])
        return jnp.asarray(np.stack(arrs)).astype(v.dtype)

    return jax.tree_util.tree_map_with_path(leaf, like)


def train_group(group, cfg, data, a, key, t_end, log_f):
    """Train the group's stacked models until `t_end` (wall clock) or a.steps; returns params, steps."""
    M = data[3].shape[0]
    k_init, key = jax.random.split(key)
    params = jax.vmap(lambda k: init_params(k, cfg))(jax.random.split(k_init, M))
    if a.init:  # continue an earlier stage: same trees, a fresh optimizer state and schedule
        params = load_stacked(parse_init(a.init), [n for n, _ in GROUPS[group]], cfg, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.inject_hyperparams(optax.adamw)(learning_rate=a.lr, b2=0.98, weight_decay=0.0))
    opt_state = jax.vmap(tx.init)(params)
    run_chunk = make_train_chunk(cfg.replace(dtype=a.compute_dtype), tx, a.batch, a.chunk, M)
    steps = a.steps

    def lr_at(step):  # linear warm-up, cosine decay to 1% of the peak
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        frac = (step - a.warmup) / max(1, steps - a.warmup)
        return a.lr * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * min(1.0, frac))))

    t0, step = time.time(), 0
    while step < steps:
        if step == 2 * a.chunk:  # chunk 1 compiled, chunk 2 timed; the budget caps --steps too
            per_chunk = time.time() - t_chunk
            fit = int((t_end - time.time()) / per_chunk) * a.chunk + step
            asked, steps = steps, max(step, min(steps, fit))
            capped = a.steps_fixed is not None and steps < asked
            print(f"[{group}] {per_chunk / a.chunk * 1e3:.1f} ms/step for {M} model(s) -> steps = {steps}"
                  + (f" (--steps {asked} capped by --budget-s)" if capped else ""), flush=True)
        t_chunk = time.time()
        lr = lr_at(step)
        opt_state[1].hyperparams["learning_rate"] = jnp.full((M,), lr, jnp.float32)
        key, k = jax.random.split(key)
        params, opt_state, loss = run_chunk(params, opt_state, data, k)
        step += a.chunk
        rec = {"group": group, "step": step, "lr": float(lr), "loss": [round(float(x), 5) for x in np.asarray(loss)],
               "elapsed_s": round(time.time() - t0, 1)}
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        print(rec, flush=True)
    return params, step, round(time.time() - t0, 1)


def quick_check(params, cfg, tok, data_dir, T, eos, key, n_mc):
    """Mean exp(ELBO/|a|) on forget01 original and paraphrased questions, and mean ELBO (nats)."""
    rows = read_split(data_dir, "forget01_perturbed")
    out = {}
    elbo = jax.jit(mc_answer_logprob, static_argnums=(1, 6))
    for field in ("question", "paraphrased_question"):
        toks, plen, rlen = encode_split(tok, [{"question": r[field], "answer": r["answer"]} for r in rows], T, eos)
        ll = np.asarray(elbo(params, cfg, jnp.asarray(toks), jnp.asarray(plen), jnp.asarray(rlen), key, n_mc))
        tag = "orig" if field == "question" else "para"
        out[f"forget01_{tag}/norm_prob"] = round(float(np.mean(np.exp(ll / (rlen - plen)))), 4)
        out[f"forget01_{tag}/mean_lp"] = round(float(np.mean(ll)), 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--groups", default="llada,dream,moe", help=f"comma list of {tuple(GROUPS)}")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all training (compile "
                    "included; the end-of-run check and saving come on top, ~20-40 s on a GPU)")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count per group (no budget calibration)")
    ap.add_argument("--data", default=str(ROOT / "timerome_jax" / "data" / "tofu"))
    ap.add_argument("--tokenizer", default=str(ROOT / "timerome_jax" / "assets" / "tokenizer" / "tokenizer.json"))
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--T", type=int, default=224)
    ap.add_argument("--n-aug", type=int, default=4, help="rule-based rewrites per training question")
    ap.add_argument("--no-retain-paraphrases", action="store_true",
                    help="do not add retain_perturbed's paraphrased questions to the training sets")
    ap.add_argument("--n-mc", type=int, default=16, help="MC samples of the end-of-run check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                    help="activation dtype during training (params and optimizer stay float32)")
    ap.add_argument("--init", default=None, help="continue from earlier weights (a fresh optimizer state and LR "
                    "schedule: one more stage): an earlier train_suite --out folder (its <model>.npz) or a "
                    "packaged HF folder (e.g. timerome_jax/assets/tofu_target_dream); one FOLDER for every "
                    "model of the group, or a comma list NAME=FOLDER")
    ap.add_argument("--recipe", default=None, choices=tuple(RECIPES),
                    help="train_default.py's stage N settings (steps, batch, lr, warm-up, seed, chunk, compute "
                         "dtype; no augmentation, no paraphrases), so that references match the packaged target; "
                         "flags given explicitly still win (e.g. --steps for a smoke run)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and a few rows per split, for a CPU smoke run")
    a = ap.parse_args(argv)
    if a.recipe:  # the recipe's values become the defaults; flags given explicitly still win
        ap.set_defaults(**RECIPES[a.recipe], n_aug=0, no_retain_paraphrases=True)
        a = ap.parse_args(argv)
    a.steps_fixed = a.steps
    if a.steps is None:
        a.steps = 10 ** 9
    t_start = time.time()
    groups = [g for g in a.groups.split(",") if g]
    for g in groups:
        if g not in GROUPS:
            raise SystemExit(f"--groups: unknown group {g!r}; expected some of {tuple(GROUPS)}")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(a.data)
    if a.tiny:  # a CPU smoke run: the first rows of each split only
        tiny_dir = out / "tiny_data"
        tiny_dir.mkdir(exist_ok=True)
        for f in data_dir.glob("*.json"):
            rows = [l for l in f.read_text().splitlines() if l.strip()]
            keep = rows[:40] if f.stem.startswith("forget") else rows[:24]
            (tiny_dir / f.name).write_text("\n".join(keep) + "\n")
        data_dir, a.T = tiny_dir, 224
    tok = Tokenizer.from_file(a.tokenizer)
    eos, mask = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|mdm_mask|>")

    # the three example rewrites of the first full question, for the log
    rng = np.random.default_rng(a.seed)
    q0 = read_split(data_dir, "full")[0]["question"]
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "args": vars(a),
              "example_rewrites": {q0: [rewrite(q0, rng) for _ in range(3)]}, "models": {}}
    weights = {g: len(GROUPS[g]) for g in groups}
    log_f = open(out / "train_log.jsonl", "w")
    key = jax.random.key(a.seed)
    for gi, g in enumerate(groups):
        cfg = model_config(FAMILY[g], tok.get_vocab_size(), mask, eos, a.tiny)
        data, counts = build_data(tok, data_dir, GROUPS[g], a.n_aug, a.T, eos, a.seed, not a.no_retain_paraphrases)
        remaining = a.budget_s - (time.time() - t_start)
        share = remaining * weights[g] / sum(weights[h] for h in groups[gi:])
        key, k = jax.random.split(key)
        params, steps, secs = train_group(g, cfg, data, a, k, time.time() + share, log_f)
        for m, (name, split) in enumerate(GROUPS[g]):
            pm = jax.tree.map(lambda x: x[m], params)
            flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(pm)[0]}
            # one self-contained file per model (the GPU machine returns few files, each <= 16 MiB)
            flat["__config__"] = np.asarray(json.dumps(dataclasses.asdict(cfg)))
            with atomic_path(out / f"{name}.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, **flat)
            check = quick_check(pm, cfg, tok, data_dir, a.T, eos, jax.random.key(a.seed + 1), a.n_mc)
            report["models"][name] = {"group": g, "family": cfg.family, **counts[name], "steps": steps,
                                      "group_train_s": secs, **check, "config": dataclasses.asdict(cfg)}
            print(json.dumps({name: {k: v for k, v in report["models"][name].items() if k != "config"}}), flush=True)
    report["total_s"] = round(time.time() - t_start, 1)
    write_json(out / "report.json", report)
    print(json.dumps({n: {k: v for k, v in m.items() if k != "config"} for n, m in report["models"].items()}, indent=1))
    print(json.dumps({"total_s": report["total_s"]}))


if __name__ == "__main__":
    main()
