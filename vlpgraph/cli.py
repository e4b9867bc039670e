"""The command line (docs/reference/cli.md): parse arguments, call the library, map errors to exit codes.

Exit codes: 0 every trial completed; 1 some trial failed (the others still ran); 2 user error
(bad graph, bad argument, bad data found before any trial ran, a ``--store`` that is a file; for ``runs``
and ``report`` also a store that does not exist, an unknown ``--graph`` or ``--metric``, or a report none
of whose trials is in the store), printed as one line per problem without a traceback unless
``--debug``; 130 / 143 `run` stopped by SIGINT / SIGTERM (the trial it was training is recorded as
interrupted at a checkpoint; the same command resumes).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlpgraph.errors import UserError

STORE_ENV = "VLPGRAPH_STORE"


def _store_dir(args) -> Path:
    """The store directory: ``--store``, else ``$VLPGRAPH_STORE``, else ./store (it need not exist yet).

    Raises UserError when the path, or a folder above it, is a file: every verb that takes ``--store``
    (run, runs, report, app) then exits 2 with one line instead of a traceback."""
    from vlpgraph.store import DB_NAME

    raw = args.store or os.environ.get(STORE_ENV) or "store"
    named = f"--store {raw}" if args.store else (f"${STORE_ENV}={raw}" if os.environ.get(STORE_ENV) else f"store {raw}")
    path = Path(raw).expanduser()
    existing = path  # the path itself, or the nearest folder above it that exists
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == path else f"is inside {existing}, a file"
        hint = f" (did you mean --store {path.parent}?)" if path.name == DB_NAME else ""
        raise UserError(f"{named} {what}: a store is a directory (it holds {DB_NAME}, runs/, cache/){hint}")
    return path


def _existing_store(args):
    """The Store of ``--store`` for the verbs that only read it; UserError when there is none."""
    from vlpgraph.store import DB_NAME, Store

    root = _store_dir(args)
    store = Store(root)
    if not store.exists():
        raise UserError(f"no store at {store.root} (no {DB_NAME} there): `vlpgraph run GRAPH` creates it "
                        f"(--store DIR or ${STORE_ENV} chooses where)")
    return store


def _wide(out: Console) -> Console:
    """Tables stay readable when piped to a file or a pager (rich falls back to 80 columns there)."""
    return Console(highlight=False, width=max(out.width, 160))


def _load(args):
    from vlpgraph.engine.spec import parse_set
    from vlpgraph.engine.sweep import load_experiment

    sets = [parse_set(s) for s in (getattr(args, "set", None) or [])]
    exp = load_experiment(args.graph, sets=sets, profile=getattr(args, "profile", None))
    wanted = getattr(args, "variant", None)
    if wanted:
        from vlpgraph.errors import did_you_mean

        unknown = [v for v in wanted if v not in exp.variants]
        if unknown:
            raise UserError([f"{args.graph}: --variant {v}: no such variant{did_you_mean(v, exp.variants)} "
                             f"(variants: {', '.join(exp.variants)})" for v in unknown])
        exp.trials = [t for t in exp.trials if t.variant in wanted]
        exp.variants = [v for v in exp.variants if v in wanted]
    return exp


# ------------------------------------------------------------------------------------- verbs


def cmd_run(args, out: Console, err: Console) -> int:
    from vlpgraph.execution.display import trial_label
    from vlpgraph.execution.executor import exit_code, stop_on_signals
    from vlpgraph.execution.ranks import init_distributed, resolve_device, shutdown_distributed
    from vlpgraph.execution.scheduler import Scheduler
    from vlpgraph.execution.sequential import SequentialExecutor
    from vlpgraph.store import Store

    ray_executor = _ray_options(args)  # before anything slow: a missing extra or a bad flag is exit 2 at once
    exp = _load(args)
    device = resolve_device(args.device)
    rank = 0 if args.dry_run else init_distributed(device)
    if rank == 0:
        err.print(f"{exp.file}: graph '{exp.name}': {len(exp.trials)} trial(s) on {device}", highlight=False)
        for note in exp.notes:
            err.print(f"note: {note}", highlight=False, markup=False)
    if args.dry_run:
        for i, t in enumerate(exp.trials, 1):
            out.print(f"[{i}/{len(exp.trials)}] {trial_label(t)}  run_id={t.run_id}", highlight=False)
        _dry_run_skips(exp, Store(_store_dir(args)), out)
        return 0
    store = Store(_store_dir(args))
    if rank == 0:
        from vlpgraph.engine.sweep import data_changes

        for line in data_changes(exp, store):  # edited data: say why trials that ran before train again
            err.print(line, highlight=False, markup=False)
    scheduler = Scheduler(store, device, err, rank=rank)
    try:
        if ray_executor is None:
            executor = SequentialExecutor(scheduler)
        else:
            from vlpgraph.execution.ray_executor import RayExecutor

            executor = RayExecutor(scheduler, args.device, **ray_executor)
        # the executor first: ray.init installs a SIGTERM handler of its own, which ours must replace.
        # SIGTERM/SIGINT: checkpoint, record the trial as interrupted, stop
        with executor, stop_on_signals(executor):
            outcomes = executor.run(exp)
    finally:
        shutdown_distributed()
    by_status = {s: [o for o in outcomes if o.status == s] for s in ("failed", "interrupted")}
    failed, interrupted = by_status["failed"], by_status["interrupted"]
    done = sum(o.status in ("completed", "skipped") for o in outcomes)
    if rank == 0:
        not_run = len(exp.trials) - len(outcomes)
        err.print(f"{done}/{len(exp.trials)} trial(s) completed, {len(failed)} failed"
                  + (f", {len(interrupted)} interrupted" if interrupted else "")
                  + (f", {not_run} not run" if not_run else "") + f"; results in {store.db_path}", highlight=False)
        again = " ".join(["vlpgraph run", args.graph] + [f"--set {s}" for s in args.set or []]
                         + ([f"--profile {args.profile}"] if args.profile else []) + ([f"--store {args.store}"] if args.store else []))
        for o in failed:
            err.print(f"  failed: {trial_label(o.trial)} ({o.trial.run_id}): {(o.error or '').splitlines()[0]}", highlight=False)
        if failed:
            err.print("running again retries the failed trials (completed ones are skipped), but a failure that does not "
                      f"depend on chance fails the same way until the graph or the data changes: {again}", highlight=False)
        if executor.stop_signal:
            err.print(f"stopped by {executor.stop_signal}; the same command resumes: {again}", highlight=False)
    if executor.stop_signal and (interrupted or len(outcomes) < len(exp.trials)):
        return exit_code(executor.stop_signal)
    return 1 if failed else 0


def _dry_run_skips(exp, store, out: Console) -> None:
    """``run --dry-run``'s last lines: the trials a run would skip as completed in ``store``. Reads
    only; a store that does not exist has none."""
    from vlpgraph.execution.display import trial_label
    from vlpgraph.execution.scheduler import completed_trials

    done = {t.run_id for t in completed_trials(store, exp)}
    n = len(exp.trials)
    for i, t in enumerate(exp.trials, 1):
        if t.run_id in done:
            out.print(f"[{i}/{n}] {trial_label(t)}: already completed ({t.run_id}), would be skipped", highlight=False)
    where = f"in {store.root}" if store.exists() else f"(no store at {store.root} yet)"
    out.print(f"{len(done)} of {n} trial(s) would be skipped as already completed {where}", highlight=False)


def _ray_options(args) -> dict | None:
    """RayExecutor's keyword arguments when the run goes to Ray (``--executor ray``, or ``--jobs N``
    with N > 1: a local Ray running N trials at once), else None (the sequential executor, which
    never imports Ray). UserError when Ray is asked for but not installed, or the flags disagree."""
    jobs = args.jobs
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: expected a number of trials at once, 1 or more")
    if args.executor != "ray" and not (jobs and jobs > 1):
        if args.address or args.trial_resources:
            raise UserError("--address and --trial-resources go with --executor ray (or --jobs N)")
        return None
    if args.dry_run:
        return None
    from vlpgraph.execution.ray_executor import TrialResources, import_ray

    import_ray()
    if jobs and args.address:
        raise UserError(f"--jobs {jobs} runs a local Ray on this machine; --address {args.address} joins a running "
                        "cluster, which runs as many trials at once as it fits: give one of the two")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--executor ray under torchrun is not supported: Ray dispatches whole trials, each in one "
                        "process; run `vlpgraph run` under torchrun without --executor ray for one trial on several GPUs")
    if args.max_retries < 0:
        raise UserError(f"--max-retries {args.max_retries}: expected 0 or more")
    resources = TrialResources.parse(args.trial_resources)
    if resources.gpu > 1:
        raise UserError(f"--trial-resources gpu={resources.gpu:g}: a Ray trial trains in one process on one GPU; "
                        "one trial on several GPUs is torchrun's (not supported under Ray yet)")
    return {"address": args.address, "jobs": jobs, "resources": resources, "max_retries": args.max_retries}


def cmd_validate(args, out: Console, err: Console) -> int:
    exp = _load(args)
    n_var = len(exp.variants)
    seeds = sorted({t.seed for t in exp.trials})
    out.print(f"{exp.file}: OK — graph '{exp.name}', {len(exp.trials)} trial(s): {n_var} variant(s), {len(seeds)} seed(s)", highlight=False)
    if exp.varied:
        out.print("varied: " + ", ".join(exp.varied), highlight=False)
    for note in exp.notes:
        out.print(f"note: {note}", highlight=False, markup=False)
    out.print(render_dag(exp.trials[0].graph), highlight=False)
    return 0


def render_dag(graph) -> str:
    lines = []
    for name in graph.order:
        node = graph.nodes[name]
        ins = ", ".join(f"{p}={'+'.join(node.input_names(p))}" for p in node.inputs)
        lines.append(f"  {name:<14} {node.kind.name:<22} {('<- ' + ins) if ins else ''}".rstrip())
    return "\n".join(lines)


def render_dot(graph) -> str:
    # DOT is a few lines of text; pydot (networkx's writer) would be one more dependency for this.
    out = [f'digraph "{graph.name}" {{', "  rankdir=LR;"]
    for name in graph.order:
        out.append(f'  {name} [label="{name}\\n{graph.nodes[name].kind.name}"];')
    for src, dst, data in graph.dag.edges(data=True):
        out.append(f'  {src} -> {dst} [label="{data.get("port", "")}"];')
    out.append("}")
    return "\n".join(out)


def cmd_show(args, out: Console, err: Console) -> int:
    exp = _load(args)
    shown = set()
    for t in exp.trials:
        if t.variant in shown:
            continue
        shown.add(t.variant)
        if args.format == "dot":
            out.print(render_dot(t.graph), highlight=False, markup=False)
        else:
            out.print(f"{exp.name} [{t.variant}]", highlight=False, markup=False)  # [name] is not rich markup
            out.print(render_dag(t.graph), highlight=False, markup=False)
    return 0


def _type_name(annotation) -> str:
    s = getattr(annotation, "__name__", None) or str(annotation)
    return s.replace("typing.", "")


def cmd_nodes(args, out: Console, err: Console) -> int:
    from vlpgraph.engine import registry
    from vlpgraph.errors import did_you_mean
    from vlpgraph.engine.graph import port_name

    kinds = registry.kinds()
    out = _wide(out)
    if args.kind is None:
        table = Table(title="node kinds", show_lines=False)
        for col in ("kind", "output", "inputs", "what it does"):
            table.add_column(col)
        for name, k in kinds.items():
            ins = ", ".join(f"{p}{'[]' if s.many else ''}{'?' if s.optional else ''}: {s.type_names()}" for p, s in k.inputs.items())
            table.add_row(name, port_name(k.output), ins or "-", k.summary)
        out.print(table)
        out.print("`vlpgraph nodes KIND` shows a kind's params.", highlight=False)
        return 0
    if args.kind not in kinds:
        raise UserError(f"unknown kind '{args.kind}'{did_you_mean(args.kind, kinds)}; `vlpgraph nodes` lists them")
    k = kinds[args.kind]
    out.print(f"[bold]{k.name}[/bold] -> {port_name(k.output)}")
    out.print(k.doc.strip() if k.doc else "(no doc)", highlight=False, markup=False)
    try:
        defaults = k.params()
    except ValueError:  # a kind with required params: what it requires depends on them
        defaults = None
    if defaults is not None:
        bare = k.requires(defaults, {})
        wired = k.requires(defaults, {name: [name] for name in k.inputs})
        if bare or wired:
            line = f"the trainer's data must provide: {', '.join(sorted(bare)) or 'nothing'}"
            if wired != bare:
                line += f" (with every optional input wired: {', '.join(sorted(wired)) or 'nothing'})"
            out.print(line + " (validation checks it)", highlight=False, markup=False)
    if k.inputs:
        t = Table(title="inputs")
        for col in ("input", "accepts", "list", "needs", "doc"):
            t.add_column(col)
        for p, s in k.inputs.items():
            t.add_row(p + ("" if not s.optional else " (optional)"), s.type_names(), "yes" if s.many else "", ", ".join(sorted(s.needs)), s.doc)
        out.print(t)
    t = Table(title="params")
    for col in ("param", "type", "default", "constraints", "doc"):
        t.add_column(col)
    for pname, f in k.params.model_fields.items():
        cons = ", ".join(str(m) for m in f.metadata)
        default = "required" if f.is_required() else repr(f.default)
        t.add_row(pname, _type_name(f.annotation), default, cons, f.description or "")
    out.print(t)
    return 0


def cmd_runs(args, out: Console, err: Console) -> int:
    from collections import Counter

    from vlpgraph.errors import did_you_mean
    from vlpgraph.store import lease_cutoff, shown_status

    store = _existing_store(args)
    every = store.runs()
    cutoff = lease_cutoff()
    for r in every:  # stale: running, but its runner fell silent for longer than the lease
        r["status"] = shown_status(r, cutoff)
    if not every:
        out.print(f"no runs in {store.root} yet: try `vlpgraph run graphs/smoke.yaml`", highlight=False)
        return 0
    graphs = sorted({r["graph"] for r in every if r.get("graph")})
    if args.graph and args.graph not in graphs:
        raise UserError(f"no runs of graph '{args.graph}' in {store.root}{did_you_mean(args.graph, graphs)}; "
                        f"graphs there: {', '.join(graphs)}")
    rows = [r for r in every if (not args.graph or r.get("graph") == args.graph)
            and (not args.status or r.get("status") == args.status)]
    if not rows:  # only --status can empty it now: a true answer, but say what there is instead
        of_graph = f" of graph '{args.graph}'" if args.graph else ""
        counts = Counter(r.get("status") for r in every if not args.graph or r.get("graph") == args.graph)
        there = ", ".join(f"{n} {s}" for s, n in counts.most_common())
        out.print(f"no {args.status} runs{of_graph} in {store.root} (there: {there})", highlight=False)
        return 0
    table = Table(title=f"runs in {store.root}")
    cols = ["run_id", "graph", "variant", "seed", "status", "step", "wall_s", "finished_at"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if r.get(c) is None else (f"{r[c]:.0f}" if c == "wall_s" else str(r[c])) for c in cols])
    _wide(out).print(table)
    return 0


def cmd_report(args, out: Console, err: Console) -> int:
    from vlpgraph.results.report import build_report
    from vlpgraph.engine.spec import parse_set

    store = _existing_store(args)
    exp = _load(args)
    wide = _wide(out)
    sets = [parse_set(s) for s in (args.set or [])]
    for table in build_report(exp, store, metrics=args.metric, sets=sets, profile=args.profile):
        wide.print(table)
    return 0


def app_main() -> Path:
    """The app's entry script: the package ``vlpgraph.app`` (the repository's app/ folder, installed
    with the package by pyproject's package-dir), wherever it was installed."""
    import vlpgraph.app

    return Path(vlpgraph.app.__file__).resolve().parent / "main.py"


def app_command(store: Path, host: str, port: int) -> list[str]:
    """The `streamlit run` command line that serves the app (no browser, no telemetry, no file watcher)."""
    return [sys.executable, "-m", "streamlit", "run", str(app_main()),
            "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            "--server.fileWatcherType", "none", "--server.runOnSave", "false",
            "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
            "--theme.base", "light", "--client.toolbarMode", "minimal"]


def cmd_app(args, out: Console, err: Console) -> int:
    import socket

    store = _store_dir(args).expanduser().resolve()
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1-65535")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise UserError(f"cannot serve on {args.host}:{args.port}: {exc.strerror} (try another --port)") from None
    env = {**os.environ, STORE_ENV: str(store)}
    err.print(f"vlpgraph app: store {store}; open http://{'localhost' if args.host == '127.0.0.1' else args.host}:"
              f"{args.port} (Ctrl-C stops it)", highlight=False)
    # exec: streamlit becomes this process, so Ctrl-C and a test's kill reach it directly
    os.execve(sys.executable, app_command(store, args.host, args.port), env)
    return 0  # not reached


def cmd_data_pack(args, out: Console, err: Console) -> int:
    """``vlpgraph data pack SOURCE --out DIR``: WebDataset shards of an annotations file or of interleaved
    documents (vlpgraph/files/shards.py)."""
    from rich.progress import track

    from vlpgraph.files.shards import pack

    source = Path(args.source).expanduser()
    images = Path(args.images).expanduser() if args.images else None
    packed = pack(source, Path(args.out).expanduser(), args.shard_size, images,
                  log=lambda line: err.print(line, highlight=False, markup=False),
                  track=lambda rows: track(rows, description="packing", console=err, transient=True))
    err.print(f"wrote {packed.samples} sample(s) in {packed.shards} shard(s)"
              + (f" ({packed.missing} image file(s) missing)" if packed.missing else ""), highlight=False)
    # the one line on stdout: what the shards param of dataset.captions (or, for documents, dataset.interleaved) takes
    out.print(packed.pattern, highlight=False, markup=False)
    return 0


# ------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlpgraph", description="Experiment graphs for vision-language pre-training.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def graph_args(sp, sets=True):
        sp.add_argument("graph", help="the graph file (YAML)")
        sp.add_argument("--profile", metavar="NAME",
                        help="apply one named set of overrides from the graph file's profiles section "
                             "(e.g. tiny or gpu); --set wins over it")
        sp.add_argument("--variant", action="append", metavar="NAME", help="only this sweep variant (repeatable)")
        if sets:
            sp.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE", help="override a param (repeatable)")

    def store_arg(sp):
        sp.add_argument("--store", help=f"store directory (default: ${STORE_ENV} or ./store)")

    sp = sub.add_parser("run", help="validate, expand the sweep and run every trial into the store")
    graph_args(sp)
    store_arg(sp)
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    sp.add_argument("--dry-run", action="store_true",
                    help="list the trials and their run ids, and which of them the store holds completed (a run "
                         "skips those); train nothing, write nothing")
    sp.add_argument("--executor", choices=["sequential", "ray"], default="sequential",
                    help="sequential: one trial after another in this process (default); ray: every pending trial as "
                         "a Ray task, as many at once as the cluster fits (needs the extra: pip install -e '.[ray]'; "
                         "the store directory must be on a filesystem every Ray node sees)")
    sp.add_argument("--jobs", type=int, metavar="N",
                    help="run N trials at once on this machine (a local Ray; N > 1 implies --executor ray)")
    sp.add_argument("--address", metavar="ADDR",
                    help="with --executor ray: the Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")
    sp.add_argument("--trial-resources", metavar="cpu=N,gpu=M",
                    help="with --executor ray: what each trial asks of Ray (default cpu=1,gpu=0); torch uses N threads")
    sp.add_argument("--max-retries", type=int, default=2, metavar="N",
                    help="with --executor ray: run a trial whose worker died again up to N times, from its "
                         "checkpoint (default 2)")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("validate", help="report every problem of a graph file at once; print its trials and DAG")
    graph_args(sp)
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("show", help="print the DAG of each variant")
    graph_args(sp)
    sp.add_argument("--format", choices=["text", "dot"], default="text",
                    help="text: one line per node with its inputs (default); dot: Graphviz DOT to render")
    sp.set_defaults(fn=cmd_show)

    sp = sub.add_parser("nodes", help="the node catalog: kinds, ports, params")
    sp.add_argument("kind", nargs="?", help="show one kind in full")
    sp.set_defaults(fn=cmd_nodes)

    sp = sub.add_parser("runs", help="list the runs in the store")
    store_arg(sp)
    sp.add_argument("--graph", help="only runs of this graph name")
    sp.add_argument("--status", choices=["queued", "running", "stale", "completed", "failed", "interrupted"],
                    help="only runs in this state; stale: marked running, but its runner gave no sign of life "
                         "for longer than the lease ($VLPGRAPH_LEASE_S, default 60 s): it died without a word "
                         "(SIGKILL, a lost node)")
    sp.set_defaults(fn=cmd_runs)

    sp = sub.add_parser("report", help="a metric by variant x varied param, mean ± std over seeds")
    graph_args(sp)
    store_arg(sp)
    sp.add_argument("--metric", action="append", metavar="EVALUATOR.METRIC", help="metric(s) to tabulate (default: each evaluator's headline)")
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("app", help="the analysis app in the browser (Streamlit): runs, ablations, "
                                    "data efficiency, patch heatmaps, samples, graphs")
    store_arg(sp)
    sp.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the store to the network)")
    sp.set_defaults(fn=cmd_app)

    sp = sub.add_parser("data", help="prepare data: `data pack` writes WebDataset shards")
    data = sp.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    sp = data.add_parser("pack", help="write WebDataset .tar shards (for the shards param of dataset.captions, or of dataset.interleaved for documents) from a "
                                      "COCO-captions .json or a .jsonl/.csv manifest with image and caption columns "
                                      "(one sample per row), or from an MMC4-style .jsonl of interleaved documents "
                                      "(one sample per document)")
    sp.add_argument("source", help="the annotations file (.json COCO captions, .jsonl or .csv; a .jsonl whose "
                                   "objects have text_list and image_info is read as documents)")
    sp.add_argument("--out", required=True, metavar="DIR", help="folder to write shard-000000.tar, ... into (new or empty)")
    sp.add_argument("--shard-size", type=int, default=10_000, metavar="N", help="samples per shard (default 10000)")
    sp.add_argument("--images", metavar="DIR", help="root folder of relative image paths (default: the source's folder)")
    sp.set_defaults(fn=cmd_data_pack)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return args.fn(args, out, err)
    except UserError as e:
        if args.debug:
            raise
        for m in e.messages:
            print(f"vlpgraph: {m}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlpgraph: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
