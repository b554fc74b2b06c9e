"""Routing recall: how much of the true (dense) attention mass each routing rule keeps.

Offline replay (``research.analysis``, Hugging Face transformers, float32 checkpoint):
one dense forward per document; in every layer, for every query whose routing pool is
non-empty under the first config and every query head, the dense attention weights are
summed over the keys each rule would make visible (sinks, local window, own chunk and
routed groups).  That share is the rule's *captured mass* ("recall": 1.0 = every key
the dense softmax weighs is attended).  Each config is paired with its oracle: exact
top-k groups by true attention mass at the same budget (same sinks, local window, own
chunk and number of routed groups per query and head); "vs oracle" = captured / oracle
captured, per layer and overall.  Because the fixed window alone holds most of the mass,
the table also gives the mass in the *routed groups only* (captured minus the rule's own
window) and its ratio to the oracle's routed mass: the part routing decides.

    python -m research.routing_recall --length 4096 --docs devils_dictionary argparse_py \\
        --config paper='{"preset": "paper"}' --config default='{}' --json recall.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from research import evalcommon as ec


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--docs", nargs="+", default=["devils_dictionary", "argparse_py"])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        help="NAME=JSON of hga keys (repeatable; the first one's window "
        "defines the measured positions); default: default={}",
    )
    ap.add_argument("--json", help="write the per-layer numbers here")
    ap.add_argument("--device", default="cpu", help="run the replay on this torch device")
    args = ap.parse_args()

    from research.analysis import Analyzer, Oracle

    configs = {}
    for item in args.config or ["default="]:
        name, _, blob = item.partition("=")
        configs[name] = ec.sim_mode(json.loads(blob) if blob else {})
    measure = {}
    for name, mode in configs.items():
        measure[name] = mode
        measure[f"{name}/oracle"] = Oracle(mode[0] if isinstance(mode, tuple) else mode, "group")
    an = Analyzer(device=args.device)
    tok = ec.tokenizer("float32")
    per_doc = {}
    for doc in args.docs:
        clock = ec.Clock()
        _, stats = an.nll(ec.doc_tokens(tok, doc, args.length), "dense", measure)
        per_doc[doc] = stats
        print(f"  {doc}: {clock()} s", flush=True)

    # pool the documents, weighting by measured (query, head) pairs
    n_layers = an.n_layers
    rows, layers = [], {}

    def pooled(rule: str, key: str) -> list[float]:
        tot = sum(st["queries_x_heads"] for st in per_doc.values())
        return [
            sum(st["rules"][rule][key][i] * st["queries_x_heads"] for st in per_doc.values()) / tot
            for i in range(n_layers)
        ]

    for name in configs:
        lay = {
            "captured": pooled(name, "per_layer_captured"),
            "oracle": pooled(f"{name}/oracle", "per_layer_captured"),
            "routed": pooled(name, "per_layer_routed"),
            "oracle_routed": pooled(f"{name}/oracle", "per_layer_routed"),
        }
        layers[name] = lay
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731  (layers have equal counts)
        r, o = mean(lay["captured"]), mean(lay["oracle"])
        rr, ro = mean(lay["routed"]), mean(lay["oracle_routed"])
        ratio = [lay["routed"][i] / max(lay["oracle_routed"][i], 1e-12) for i in range(n_layers)]
        worst = min(range(n_layers), key=lambda i: ratio[i])
        rows.append(
            [
                name,
                r,
                o,
                r / o,
                rr,
                ro,
                rr / ro,
                f"{ratio[worst]:.3f} (layer {worst})",
                sum(1 for x in ratio if x >= 0.9),
            ]
        )
    print(
        f"docs {', '.join(args.docs)}, {args.length} tokens, float32, offline replay; "
        f"queries with a non-empty pool under '{next(iter(configs))}'"
    )
    print(
        ec.md_table(
            [
                "config",
                "captured mass",
                "oracle captured",
                "vs oracle",
                "routed-group mass",
                "oracle routed",
                "routed vs oracle",
                "worst layer (routed vs oracle)",
                "layers >= 90% (routed)",
            ],
            rows,
        )
    )
    print()
    header = ["layer"] + [
        f"{n} {k}"
        for n in configs
        for k in ("captured", "oracle", "routed", "oracle routed", "routed ratio")
    ]
    lrows = []
    for i in range(n_layers):
        row = [i]
        for n in configs:
            L = layers[n]
            row += [
                L["captured"][i],
                L["oracle"][i],
                L["routed"][i],
                L["oracle_routed"][i],
                L["routed"][i] / max(L["oracle_routed"][i], 1e-12),
            ]
        lrows.append(row)
    print(ec.md_table(header, lrows))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "docs": args.docs,
                    "length": args.length,
                    "configs": {n: c.as_dict() for n, c in configs.items()},
                    "layers": layers,
                    "per_doc": per_doc,
                },
                indent=1,
                default=list,
            )
        )


if __name__ == "__main__":
    main()
