"""Fine-tuning variants on one kept loop project: same parent, flags and training set, only the child changes.

    python bench/loop.py --dataset flyem --keep DIR              # once: parent, segmentation, flags, training set
    python bench/loop_variants.py DIR/flyem OUT.json 'label:{"anchor_weight": 10, "learning_rate": 1e-3}' ...

Each variant: a train job (2 ranks, through ``launch.jobs.submit``) from the parent on the newest training set
(or ``"training_set": ID``) with bench/loop.py's FlyEM child settings (steps, mix, lr, anchor) overridden by the
JSON (the variants in bench/results/loop_finetune_variants.json ran from lr 3e-4 without anchor; each records
its full parameters), then
:func:`pipeline_core.loop.compare_from_catalog` on the held-out product (errors at the flag windows, held-out VI
with its split/merge parts). Children are deterministic (same variant → same VI to 4 decimals), so differences
between variants are the variants' own; the held-out VI of the parent's own checkpoints moves by ~0.4 over its
last 300 steps, so read small differences with that in mind. Results are added to OUT.json under each label.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    import loop as B
    from pipeline_core import loop
    from pipeline_core.project import Project
    from pipeline_core.runs import prepare_run

    root, outf = Path(argv[0]), Path(argv[1])
    proj = Project.open(root)
    cat = proj.catalog
    parent = [m for m in cat.models() if m.parent_id is None][0]
    ts = cat.training_sets()[-1]
    imgs = cat.products("aligned")
    labs = cat.products("labels")
    ev_img, ev_lab = imgs[0].id, labs[0].id  # held-out ingested first
    first = cat.runs("train")[0]  # the parent's: its inputs are the original data the child mixes in
    keep = ("preset", "batch_size", "checkpoint_every", "holdout_z", "warmup_steps", "lr_scaling", "seed", "ema_decay")
    c = B.CONFIG["flyem"]
    base = {**{k: v for k, v in first.params.items() if k in keep}, "steps": c["child_steps"], "training_set": ts.id,
            "mix_original": c["mix"], "learning_rate": c["child_lr"],
            "anchor_weight": loop.FINETUNE_ANCHOR_WEIGHT if c.get("anchor_weight") is None else c["anchor_weight"]}
    out = json.loads(outf.read_text()) if outf.exists() else {}
    for spec in argv[2:]:
        label, _, js = spec.partition(":")
        try:
            params = {**base, **json.loads(js or "{}")}
        except ValueError:
            raise SystemExit(f"variant {spec!r}: expected LABEL:JSON, e.g. 'a10:{{\"anchor_weight\": 10}}'")
        t = time.perf_counter()
        r = B._submit(proj, prepare_run(proj, "train", params=params, input_ids=list(first.input_product_ids), model_id=parent.id,
                                        user=B.USER))
        child = r.metrics["model_id"]
        cmp = loop.compare_from_catalog(proj, child, eval_image_id=ev_img, eval_labels_id=ev_lab, user=B.USER,
                                        eval_min_size=1000)
        row = cmp["held_out"][0]
        res = {"params": params, "child": child, "seconds": round(time.perf_counter() - t),
               "errors_at_flags": cmp.get("errors_at_flags"),
               **{w: {k: row[w][k] for k in ("vi", "vi_split", "vi_merge", "are") if k in row[w]}
                  for w in ("parent", "child")}}
        out[label] = res
        outf.parent.mkdir(parents=True, exist_ok=True)
        outf.write_text(json.dumps(out, indent=1, default=float))
        e = res["errors_at_flags"] or {}
        print(f"{label:24s} errors at flags {e.get('parent')} -> {e.get('child')}  held-out VI "
              f"{res['parent']['vi']:.3f} -> {res['child']['vi']:.3f} (split {res['child']['vi_split']:.2f}, "
              f"merge {res['child']['vi_merge']:.2f})", flush=True)


if __name__ == "__main__":
    main()
