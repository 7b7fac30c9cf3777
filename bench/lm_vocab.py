"""Diagnostic (on demand, not a target bench): where a trimmed-vocabulary LM student loses perplexity.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/lm_vocab.py --out bench/results/lm_vocab.json [--student DIR] [--eval-sentences 100]

A trimmed student (kdops.lm.student) scores a dropped id as p(<other>) / #dropped. This scores the same
held-out movie sentences as bench/lm.py, with the same teacher tokens and normaliser, under other ways of
giving <other>'s mass to the dropped ids, none of them trained:

- ``uniform``: p(<other>) / #dropped (a student without a fitted tail);
- ``fitted``: the tail the round fitted and stored with the student (kdops.lm.tail; what bench/lm.py reports);
- ``tail_full``: a softmax over the teacher's embedding rows of the dropped ids, fed the student's last
  hidden state (p(<other>) x tail), i.e. an adaptive-softmax tail taken from the teacher; full rank;
- ``tail_rank<r>``: the same through a rank-r SVD of those rows (what would fit the parameter budget);
- ``spelled``: no <other>; each dropped token is spelled with kept tokens (greedy longest match), and
  <other> is renormalised away;
- ``seen<n>_mix``: a softmax over the teacher's embedding rows of the ``n`` dropped ids the teacher put most
  top-k mass on in the training text (its cached top-k; ``all``: every such id), fed the student's last hidden
  state, mixed half and half with ``fitted`` (which covers the other dropped ids): a context tail cut down to
  the ids that occur in the domain, n x 576 extra parameters, untrained;
- ``oracle_tail``: p(<other>) x the teacher's own distribution over the dropped ids in that context: the
  best any tail could do for this student (it needs the teacher at scoring time, so it is a bound only).

It prints a table and writes JSON; ``uniform_penalty_nats`` is what the uniform spread alone costs per token.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def spell(tok, kept_strings: dict[str, int], longest: int, token_id: int) -> list[int] | None:
    """A dropped token's string as kept ids, greedy longest match (None when impossible)."""
    s, out = tok.convert_ids_to_tokens(token_id), []
    while s:
        for n in range(min(longest, len(s)), 0, -1):
            if s[:n] in kept_strings:
                out.append(kept_strings[s[:n]])
                s = s[n:]
                break
        else:
            return None
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Where to write the JSON report.")
    ap.add_argument("--student", default=None,
                    help="Trimmed LM student dir: a bench/lm.py JSON's student_dir (default: "
                         "<KDOPS_HOME>/students/smollm2-movie-lm). A fitted TailHead is ignored: every row "
                         "scores the student's context-free part.")
    ap.add_argument("--eval-sentences", type=int, default=100, help="Held-out movie test sentences (bench/lm.py's).")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--ranks", type=int, nargs="*", default=[16, 32, 64, 128])
    ap.add_argument("--seen-rows", type=int, nargs="*", default=[2000, 4000, 8000, 0],
                    help="Row counts for the seen<n>_mix tails (0: every dropped id with teacher mass).")
    ap.add_argument("--train-sentences", type=int, default=8029, help="Training sentences for the teacher mass (bench/lm.py's).")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from kdops import corpora
    from kdops.lm.student import load_lm_student
    from kdops.lm.teacher import HFCausalLMTeacher, smollm2_dir
    from kdops.paths import subdir

    torch.set_num_threads(args.threads)
    student, tok, _ = load_lm_student(args.student or subdir("students") / "smollm2-movie-lm")
    if not student.trimmed:
        raise SystemExit("the student keeps the whole vocabulary: nothing to diagnose")
    student.eval()
    teacher = HFCausalLMTeacher(smollm2_dir())
    vocab = student.full_vocab_size
    is_dropped = torch.ones(vocab, dtype=torch.bool)
    is_dropped[student.keep_ids] = False
    dropped = is_dropped.nonzero().squeeze(1)
    row = torch.full((vocab,), -1, dtype=torch.long)
    row[dropped] = torch.arange(len(dropped))
    emb = teacher.model.get_input_embeddings().weight.detach()[dropped].float()  # (D, H)
    u, s, vh = torch.linalg.svd(emb, full_matrices=False)
    tails = {"tail_full": (emb, None), **{f"tail_rank{r}": (u[:, :r] * s[:r], vh[:r].T) for r in args.ranks}}
    # the dropped ids the teacher expects in this domain: its top-k mass (and the targets) over bench/lm.py's
    # training sentences, from the cache bench/lm.py filled
    import numpy as np

    from kdops.lm.cache import LMSoftLabelCache
    from kdops.paths import home

    train = corpora.load("sentiment", split="train", domains=("movie",)).rows.sample(n=args.train_sentences,
                                                                                     random_state=args.seed)
    tseqs = teacher.encode(train["text"].tolist(), args.max_length)
    mass = np.zeros(vocab)
    for q, (ids_k, lps_k) in zip(tseqs, LMSoftLabelCache(home() / "lm_soft_labels.sqlite").get_or_compute_topk(teacher, tseqs, 32)):
        np.add.at(mass, np.asarray(q[1:], np.int64), 1.0)
        np.add.at(mass, ids_k.reshape(-1).astype(np.int64), np.exp(lps_k.reshape(-1).astype(np.float64)))
    mass[~is_dropped.numpy()] = 0.0
    by_mass = np.argsort(-mass)[: int((mass > 0).sum())]
    full_emb = teacher.model.get_input_embeddings().weight.detach().float()
    seen = {}
    for n in args.seen_rows:
        ids_n = torch.from_numpy(by_mass[: n or len(by_mass)].copy())
        pos = torch.full((vocab,), -1, dtype=torch.long)
        pos[ids_n] = torch.arange(len(ids_n))
        seen[f"seen{n or 'all'}_mix"] = (full_emb[ids_n], pos)
    kept_strings = {tok.convert_ids_to_tokens(k): k for k in student.keep_ids.tolist()}
    longest = max(map(len, kept_strings))

    texts = corpora.load("sentiment", split="test", domains=("movie",)).rows.head(args.eval_sentences)["text"].tolist()
    nll = {k: 0.0 for k in ["teacher", "uniform", "fitted", *tails, *seen, "spelled", "oracle_tail"]}
    tokens = oov = unspellable = 0
    with torch.no_grad():
        for seq in teacher.encode(texts, args.max_length):
            ids, tgt = torch.tensor([seq]), torch.tensor(seq[1:])
            t_logits = teacher.model(ids).logits.float()[0, :-1]  # (T-1, V)
            nll["teacher"] -= float(torch.log_softmax(t_logits, -1).gather(-1, tgt[:, None]).sum())
            oracle = torch.log_softmax(t_logits[:, dropped], -1)  # (T-1, D)
            hidden = student.model.model(input_ids=student.map_ids(ids)).last_hidden_state  # (1, T, H)
            lp = torch.log_softmax(student.model.lm_head(hidden)[0, :-1].float(), -1)  # (T-1, V_s)
            mapped = student.map_ids(tgt)
            base = lp.gather(-1, mapped[:, None]).squeeze(-1)
            miss = mapped == student.other_id
            tokens, oov = tokens + len(tgt), oov + int(miss.sum())
            nll["uniform"] -= float((base - math.log(len(dropped)) * miss).sum())
            nll["fitted"] -= float((base + student.tail_logprob[tgt] * miss).sum())
            at = oracle.gather(-1, row[tgt].clamp(min=0)[:, None]).squeeze(-1)
            nll["oracle_tail"] -= float((base + torch.where(miss, at, torch.zeros_like(at))).sum())
            h = hidden[0, :-1].float()
            for name, (rows, proj) in tails.items():
                tail = torch.log_softmax((h if proj is None else h @ proj) @ rows.T, -1)  # (T-1, D)
                at = tail.gather(-1, row[tgt].clamp(min=0)[:, None]).squeeze(-1)
                nll[name] -= float((base + torch.where(miss, at, torch.zeros_like(at))).sum())
            fitted = student.tail_logprob[tgt]
            for name, (rows, pos) in seen.items():
                at = torch.log_softmax(h @ rows.T, -1).gather(-1, pos[tgt].clamp(min=0)[:, None]).squeeze(-1)
                at = torch.where(pos[tgt] >= 0, at, torch.full_like(at, -1e9))
                mix = torch.logaddexp(at + math.log(0.5), fitted + math.log(0.5))
                nll[name] -= float((base + torch.where(miss, mix, torch.zeros_like(mix))).sum())
            spelled = [seq[0]]
            for t in seq[1:]:
                pieces = [t] if not is_dropped[t] else spell(tok, kept_strings, longest, t)
                if pieces is None:
                    unspellable, pieces = unspellable + 1, [t]
                spelled.extend(pieces)
            sids = torch.tensor([spelled])
            slp = torch.log_softmax(student(sids)[0, :-1].float(), -1)
            other = student.other_id
            slp = slp[:, :other] - torch.log1p(-slp[:, other].exp()).unsqueeze(-1)  # never <other>: renormalise
            nll["spelled"] -= float(slp.gather(-1, student.map_ids(sids[0, 1:])[:, None]).sum())
    out = {"tokens": tokens, "oov_tokens": oov, "oov_share": round(oov / tokens, 4), "dropped_ids": len(dropped),
           "kept_ids": int(student.keep_ids.numel()), "unspellable": unspellable,
           "uniform_penalty_nats": round(oov * math.log(len(dropped)) / tokens, 4),
           "student_params": student.num_parameters(), "teacher_params": teacher.num_parameters(),
           "tail_params": {**{k: rows.numel() + (0 if p is None else p.numel()) for k, (rows, p) in tails.items()},
                           **{k: rows.numel() for k, (rows, _) in seen.items()}},
           "dropped_ids_with_teacher_mass": len(by_mass),
           "ppl": {k: round(math.exp(v / tokens), 2) for k, v in nll.items()},
           "ppl_ratio": {k: round(math.exp((v - nll["teacher"]) / tokens), 4) for k, v in nll.items() if k != "teacher"},
           "command": " ".join(sys.argv)}
    print(f"{'scoring of dropped ids':<24}{'ppl':>9}{'/ teacher':>11}{'extra params (M)':>18}")
    print(f"{'teacher':<24}{out['ppl']['teacher']:>9.2f}")
    for k, r in out["ppl_ratio"].items():
        extra = out["tail_params"].get(k, 0) / 1e6
        print(f"{k:<24}{out['ppl'][k]:>9.2f}{r:>11.4f}{extra:>18.2f}")
    print(f"{oov} of {tokens} held-out tokens ({out['oov_share']:.1%}) are dropped ids; the uniform spread costs "
          f"{out['uniform_penalty_nats']} nats per token (x{math.exp(out['uniform_penalty_nats']):.3f} perplexity)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
