"""Evaluate one checkpoint under the CPU protocol with other samplers (not the protocol: each row says what differs):
FID, held-out and training-prompt adherence, and the evaluation's seconds, one JSON line per setting.

    python -m tools.sampler_sweep CKPT euler:8:6 euler:16:6 heun:8:6 euler:8:6:2.0 euler:8:6:3.0:0.3-1 [n_train]

A setting is method:steps:shift[:cfg[:lo-hi]]: cfg the guidance scale, lo-hi the guidance interval in t (default:
the protocol's).
"""
import json
import sys

import eval as evaluation


def parse_setting(s: str) -> dict:
    """"euler:8:6:2.5:0.3-1" -> the protocol fields it overrides."""
    method, steps, shift, *rest = s.split(":")
    out = {"method": method, "steps": int(steps), "shift": float(shift)}
    if rest:
        out["cfg_scale"] = float(rest[0])
    if len(rest) > 1:
        lo, hi = rest[1].split("-")
        out["interval"] = (float(lo), float(hi))
    return out


def main(ckpt, settings, n_train=None):
    model, enc = evaluation.load_checkpoint(ckpt)
    frozen = dict(evaluation.PROTOCOLS["cpu"])
    for s in settings:
        evaluation.PROTOCOLS["cpu"] = dict(frozen, **parse_setting(s), **({"n_train": n_train} if n_train else {}))
        m = evaluation.evaluate(model, enc, "cpu", progress=False)
        print(json.dumps({"sampler": s, "n": m["n"], "fid": round(m["fid"], 2),
                          "held_out": round(100 * m["adherence"]["all"], 1),
                          "held_out_parts": {k: round(100 * v, 1) for k, v in m["adherence"].items()},
                          "train": round(100 * m["adherence_train"]["all"], 1),
                          "n_train": evaluation.PROTOCOLS["cpu"]["n_train"], "eval_s": m["eval_seconds"]}), flush=True)
    evaluation.PROTOCOLS["cpu"] = frozen


if __name__ == "__main__":
    args = sys.argv[1:]
    n_train = int(args.pop()) if args[-1].isdigit() else None
    main(args[0], args[1:], n_train)
