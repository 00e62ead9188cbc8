"""``archroute label`` and ``archroute train``.

    archroute label --n 2000 --out data/labels/reference.jsonl   # score answers on the pair
    archroute train --labels data/labels/reference.jsonl          # fit, evaluate, ship

``label`` builds the request mix from the corpus (:mod:`classifiers.training.synthetic_mix`) and measures
each request's gap on a backend pair (:mod:`classifiers.training.labels`, cached and resumable).
``train`` on labels of real requests (``archroute label --requests``) measures transfer:
leave-one-source-out per source and pooled (:mod:`classifiers.training.train_router`), a random split as
the secondary number, then fits on every trainable source and ships the artifact with its
calibrated profile thresholds. On labels of the synthetic mix it fits on the training
documents and evaluates on the held-out ones (AUC, accuracy, Brier, regret vs the oracle).
Both print the results table, write it as JSON and Markdown, and save the LightGBM router
as the artifact (default runs/classifier; the shipped classifiers/default only when named).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from models.registry import REFERENCE_SPECS

log = logging.getLogger(__name__)

DEFAULT_LABELS = "data/labels/reference.jsonl"
MODELS = ("lightgbm", "logistic", "rules", "embedding")


def add_label(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="measure request labels on a backend pair",
                       description="Score each request's reference answer under both backends "
                                   "(gap = loss_transformer - loss_hybrid, nats/token). Real "
                                   "requests come from --requests (JSONL files or folders in "
                                   "the documented format); without it, the synthetic mix is "
                                   "built from --corpus.")
    p.add_argument("--requests", nargs="+", default=None, metavar="PATH",
                   help="request files or folders of *.jsonl (e.g. ../shared/data/requests); "
                        "every file is validated before anything is scored")
    p.add_argument("--per-source", type=int, default=None, metavar="N",
                   help="with --requests: at most N requests per file (fixed-seed sample)")
    p.add_argument("--corpus", default="data/corpus",
                   help="without --requests: corpus dir (train.jsonl) or file for the synthetic mix")
    p.add_argument("--n", type=int, default=2000, help="requests in the synthetic mix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_LABELS, help="label cache (JSONL, appended)")
    p.add_argument("--transformer", default=REFERENCE_SPECS["transformer"],
                   help="backend spec: reference:NAME | model dir | http(s)://host/v1#model")
    p.add_argument("--hybrid", default=REFERENCE_SPECS["hybrid"], help="backend spec, as --transformer")
    p.add_argument("--margin", type=float, default=None, help="tie margin, nats/token (0.05)")
    p.add_argument("--chunk-size", type=int, default=32, help="requests per scoring call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_label)


def _location(backend) -> str | None:
    try:
        return backend.info().location
    except Exception:  # noqa: BLE001 - a backend that cannot describe itself has no files
        return None


def _write_exclusions(out: str, tuned: frozenset[str], files: list[dict]) -> None:
    """``OUT.excluded.json`` beside a label file: which request ids were left out and why
    (the tuned pair's ``sft_data.json``, by path and sha256), so the file says it itself."""
    import json
    from pathlib import Path

    p = Path(f"{out}.excluded.json")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"why": "requests the pair was instruction-tuned on (issue #22)",
                             "from": files, "ids": sorted(tuned)}, indent=1) + "\n")


def run_label(args: argparse.Namespace) -> int:
    from classifiers.training.labels import (
        MARGIN,
        LabelSource,
        group_table,
        label_requests,
        summarize,
    )
    from classifiers.training.synthetic_mix import build_mix, load_documents
    from models.registry import from_spec

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    margin = MARGIN if args.margin is None else args.margin
    mix: Sequence[LabelSource]
    transformer = from_spec(args.transformer)
    hybrid = from_spec(args.hybrid)
    if args.requests:
        from classifiers.training.realdata import RequestFileError, read_requests
        from models.reference_pair import tuned_request_ids

        # never label a request the pair was instruction-tuned on (issue #22)
        tuned, tuned_files = tuned_request_ids(*(_location(b) for b in (transformer, hybrid)))
        try:
            mix = read_requests(args.requests, per_group=args.per_source, seed=args.seed,
                                exclude=tuned)
        except RequestFileError as exc:
            raise SystemExit(f"archroute label: {exc}") from None
        if tuned:
            print(f"left out the {len(tuned)} request ids the pair was tuned on: "
                  + ", ".join(f"{f['path']} (sha256 {f['sha256'][:12]})" for f in tuned_files))
            if args.out:
                _write_exclusions(args.out, tuned, tuned_files)
    else:
        mix = build_mix(load_documents(args.corpus), args.n, seed=args.seed)
    t0 = time.perf_counter()
    rows = label_requests(mix, transformer, hybrid, cache=args.out, margin=margin,
                          chunk_size=args.chunk_size, progress=not args.no_progress)
    s = summarize(rows, margin)
    print(f"{s['n']} requests labelled in {time.perf_counter() - t0:.0f} s -> {args.out}")
    print(f"gap mean {s['gap_mean']:+.4f} std {s['gap_std']:.4f} nats/token; "
          f"hybrid wins {s['hybrid_wins']:.1%}, transformer wins {s['transformer_wins']:.1%} "
          f"beyond ±{margin}")
    for key in (("group", "kind") if args.requests else ("kind", "domain")):
        print(group_table(rows, key, margin))
    if args.requests:
        n_cut = sum(bool(r.get("ref_cut")) for r in rows)
        n_pcut = sum(bool(r.get("prompt_cut")) for r in rows)
        print(f"references cut to fit the context: {n_cut}; prompts cut from the left: {n_pcut}")
    skipped = len(mix) - len(rows)
    if skipped:
        print(f"{skipped} requests were refused by a backend (see the log)")
    return 0


DEFAULT_OUT = "runs/classifier"  # not the shipped classifiers/default: name it to replace it


def add_train(sub: argparse._SubParsersAction) -> None:
    from classifiers.artifact import DEFAULT_DIR

    p = sub.add_parser("train", help="train the request classifier")
    p.add_argument("--labels", default=None,
                   help=f"label file from `archroute label` (default {DEFAULT_LABELS}; with "
                        "--from-log: optional, added to the log's labels)")
    p.add_argument("--out", default=None,
                   help=f"artifact directory to write (default {DEFAULT_OUT}; never the shipped "
                        f"{DEFAULT_DIR} unless named here; required with --from-log)")
    p.add_argument("--from-log", metavar="DB", default=None,
                   help="train on the router's decision log (SQLite path or postgresql:// URL): "
                        "its requests with a scored reference (POST /v1/feedback with "
                        "`reference`), plus --labels if given; implies --quick")
    p.add_argument("--quick", action="store_true",
                   help="real labels: fit the shipped variant once and self-check it, without "
                        "the leave-one-source-out sweep (minutes instead of hours)")
    p.add_argument("--probe", action="store_true",
                   help="real labels: add the prompt probe's features (each label row's "
                        "`probe`, which `archroute label` records) to the shipped variant's, "
                        "for a `probe` profile (docs/router.md); implies --quick")
    p.add_argument("--results", default="data/labels/results.json",
                   help="results JSON (a Markdown table is written beside it)")
    p.add_argument("--models", default=",".join(MODELS), help=f"synthetic-mix labels: comma list of {MODELS}")
    p.add_argument("--margin", type=float, default=None,
                   help="synthetic-mix labels: tie margin, nats/token (0.05; real labels use 0.05)")
    p.add_argument("--center", default="0",
                   help="synthetic-mix labels: class boundary on the gap: a number (nats/token; 0 = which backend "
                        "is better) or 'median' (relatively transformer-favoured requests, for a "
                        "pair where one backend wins almost everything)")
    p.add_argument("--min-class", type=int, default=20,
                   help="synthetic-mix labels: fewest training requests per class before "
                        "training refuses")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", nargs="+", default=None, metavar="PATH",
                   help="real labels: the request files they came from, for provenance "
                        "(sha256, licence) in the artifact (default: ../shared/data/requests)")
    p.add_argument("--variants", choices=("all", "shipped"), default="all",
                   help="real labels: measure every model variant leave-one-source-out "
                        "(classifiers.training.train_router.VARIANTS), or only the shipped one")
    p.add_argument("--mix-labels", default=None, metavar="FILE",
                   help="real labels: labels of the synthetic request mix to add to every "
                        "training set as one more source (never tested on), to measure "
                        "whether it helps leave-one-source-out")
    p.add_argument("--plots", default=None,
                   help="real labels: folder for the reliability diagram (default: beside "
                        "--results)")
    p.set_defaults(func=run_train)


def results_table(results: dict) -> str:
    """Markdown table of the held-out results (one row per model and reference policy)."""
    lines = ["| model | AUC | accuracy | Brier | regret (nats/token) | routed to transformer |",
             "| --- | --- | --- | --- | --- | --- |"]

    def f(v, fmt):
        return "–" if v is None or v != v else format(v, fmt)

    for name, m in results["models"].items():
        lines.append(f"| {name} | {f(m.get('auc'), '.3f')} | {f(m.get('accuracy'), '.3f')} | "
                     f"{f(m.get('brier'), '.3f')} | {f(m.get('regret'), '.4f')} | "
                     f"{f(m.get('routed_transformer'), '.1%')} |")
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from classifiers import artifact
    from classifiers.features import extract
    from classifiers.request import RoutingRequest
    from classifiers.training.estimators import (
        EmbeddingRouter,
        LightGBMGapRegressor,
        LightGBMRouter,
        LogisticRouter,
        RulesRouter,
    )
    from classifiers.training.labels import (
        MARGIN,
        by_group,
        labels_hash,
        read_labels,
        require_labels,
        summarize,
    )
    from classifiers.training.metrics import reference_rows, router_metrics
    from models.provenance import git_commit

    if getattr(args, "from_log", None):  # router.learning.retrain runs those
        raise SystemExit("archroute train --from-log: run it as `archroute train` (the "
                         "router's learning loop, router/learning/retrain.py)")
    args.labels = args.labels or DEFAULT_LABELS
    args.out = args.out or DEFAULT_OUT
    margin = MARGIN if args.margin is None else args.margin
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    rows = [r for r in require_labels(args.labels, latest_only=True) if r["gap"] == r["gap"]]
    if not rows:
        raise SystemExit(f"no labels in {args.labels} (run `archroute label` first)")
    if "group" in rows[0]:  # real requests: leave-one-source-out, calibrated thresholds
        from classifiers.training.realdata import DEFAULT_DIR
        from classifiers.training.train_router import SHIPPED, VARIANTS, train_real

        variants = list(VARIANTS) if getattr(args, "variants", "all") == "all" else [SHIPPED]
        mix = getattr(args, "mix_labels", None)
        extra = ([r for r in read_labels(mix, latest_only=True) if r["gap"] == r["gap"]]
                 if mix else [])
        if mix and not extra:
            raise SystemExit(f"no labels in {mix}")
        probe = bool(getattr(args, "probe", False))
        if getattr(args, "quick", False) or probe:
            from classifiers.training.train_router import fit_quick, routing_request

            rows = [*rows, *({**r, "group": "synthetic-mix"} for r in extra)]
            try:
                res = fit_quick(rows, [routing_request(r) for r in rows], args.out, args.seed,
                                {"labels": Path(args.labels).name}, probe=probe)
            except ValueError as exc:
                flag = "--probe" if probe else "--quick"
                raise SystemExit(f"archroute train {flag}: {exc}") from None
            print(quick_summary(res, args.out))
            return 0
        train_real(rows, args.out, args.results, args.requests or [str(DEFAULT_DIR)],
                   variants=variants, seed=args.seed,
                   plots_dir=args.plots or str(Path(args.results).parent), extra_rows=extra)
        print(f"artifact -> {args.out}; results -> {args.results}")
        return 0
    if getattr(args, "probe", False):
        raise SystemExit(f"archroute train --probe: {args.labels} holds labels of the "
                         "synthetic mix; the probe is trained on labels of real requests "
                         "(`archroute label --requests ...`)")
    reqs = [RoutingRequest.from_prompt(r["prompt"]) for r in rows]
    X = np.stack([extract(q) for q in tqdm(reqs, desc="features", unit="req")])
    gap = np.array([r["gap"] for r in rows])
    test = np.array([r["split"] == "test" for r in rows])
    center = float(np.median(gap[~test])) if args.center == "median" else float(args.center)
    decisive = np.abs(gap - center) > margin
    fit_mask = ~test & decisive
    y = (gap < center).astype(int)  # 1 = the transformer serves it better (than `center`)
    log.info("train %d (%d decisive), test %d", (~test).sum(), fit_mask.sum(), test.sum())
    counts = np.bincount(y[fit_mask], minlength=2)
    if counts.min() < args.min_class:
        s = summarize(rows, margin)
        raise SystemExit(
            f"degenerate labels: {counts[1]} transformer-better and {counts[0]} hybrid-better "
            f"training requests beyond ±{margin} of {center:+.3f} (gap mean "
            f"{s['gap_mean']:+.3f}, std {s['gap_std']:.3f}). This pair has too little contrast "
            "to learn who wins; `--center median` learns which requests favour the "
            "transformer relatively.")

    results: dict = {"labels": str(args.labels), "margin": margin, "center": center,
                     "n_train": int((~test).sum()),
                     "n_test": int(test.sum()), "label_summary": summarize(rows, margin),
                     "test_summary": summarize([r for r, t in zip(rows, test, strict=True) if t], margin),
                     "by_kind": by_group(rows, "kind", margin),
                     "by_domain": by_group(rows, "domain", margin),
                     "models": {}}
    router = regressor = None
    for name in tqdm(models, desc="models", unit="model"):
        t0 = time.perf_counter()
        if name == "lightgbm":
            router = LightGBMRouter(random_state=args.seed).fit(X[fit_mask], y[fit_mask])
            regressor = LightGBMGapRegressor(random_state=args.seed).fit(X[~test], gap[~test])
            p = router.predict_proba(X[test])[:, 1]
            m = router_metrics(p, gap[test], margin, center)
            # the regressor as a router: transformer when the expected gap is below center
            g = regressor.predict(X[test])
            results["models"]["lightgbm-gap-regressor"] = {
                **router_metrics((g < center).astype(float), gap[test], margin, center),
                "auc": router_metrics(center - g, gap[test], margin, center)["auc"],
                "brier": None, "gap_mae": float(np.abs(g - gap[test]).mean())}
        elif name == "logistic":
            p = LogisticRouter().fit(X[fit_mask], y[fit_mask]).predict_proba(X[test])[:, 1]
            m = router_metrics(p, gap[test], margin, center)
        elif name == "rules":
            p = RulesRouter().fit(X[fit_mask], y[fit_mask]).predict_proba(X[test])[:, 1]
            m = router_metrics(p, gap[test], margin, center)
        else:
            try:
                emb = EmbeddingRouter()
                E = emb.embed(reqs)
            except ImportError as exc:
                log.warning("skipping the embedding baseline: %s", exc)
                continue
            p = emb.fit(None, y[fit_mask], embeddings=E[fit_mask]).predict_proba(
                None, embeddings=E[test])[:, 1]
            m = router_metrics(p, gap[test], margin, center)
        m["fit_s"] = time.perf_counter() - t0
        results["models"][name if name != "lightgbm" else "lightgbm (shipped)"] = m
        if name == "lightgbm":  # keep the regressor row right after the main model
            results["models"]["lightgbm-gap-regressor"] = results["models"].pop(
                "lightgbm-gap-regressor")
    results["models"].update(reference_rows(gap[test]))

    table = results_table(results)
    print(table)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    if router is not None:
        meta = {"margin": margin, "center": center, "git_commit": git_commit(),
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "training_data": {"labels": Path(args.labels).name, "sha256": labels_hash(rows),
                                  "pair": rows[0].get("pair"), "n_train": int(fit_mask.sum()),
                                  "n_test": int(test.sum())},
                "params": router.get_params(), "metrics": results["models"]["lightgbm (shipped)"],
                "label_summary": results["label_summary"]}
        artifact.save(args.out, router, regressor, meta)
        print(f"artifact -> {args.out}; results -> {out} and {out.with_suffix('.md')}")
    return 0


def quick_summary(res: dict, out: str) -> str:
    """What ``--quick`` / ``--from-log`` fitted, in a few lines."""
    from classifiers.training.train_router import fmt_ci

    o = res["out_of_fold"]
    thr = ", ".join(f"{k} {v:.3f}" for k, v in res["thresholds"].items())
    return (f"{res['n_train']} labelled requests ({res['n_transformer_better']} transformer-"
            f"better, {res['n_hybrid_better']} hybrid-better beyond the margin), fitted in "
            f"{res['fit_s']:.1f} s\n"
            f"out-of-fold (group folds of these sources: in-distribution): AUC "
            f"{fmt_ci(o['auc'], o['auc_ci'])}, oracle gap recovered "
            f"{fmt_ci(o['recovered'], o['recovered_ci'], '.2f')}\n"
            f"thresholds: {thr}\n"
            f"artifact -> {out} (sha256 {res['sha256'][:12]}, self-check passed); load it with "
            f"POST /admin/reload {{\"artifact\": \"{out}\"}}")
