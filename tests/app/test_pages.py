"""Every page of the Streamlit app through streamlit.testing.v1.AppTest (no browser): on an empty store,
on a store filled by real runs (the smoke graph + the TiMix sweep's tiny profile), on the synthetic
store with known values, and while a sweep writes."""

from __future__ import annotations

import base64
import statistics
import time

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from tests.helpers import ROOT, SYN_SEEDS, start_run, syn_rsum, tiny_graph
from vlpgraph.results import analysis
from vlpgraph.cli import main
from vlpgraph.store import Store

APP = str(ROOT / "app" / "main.py")
PAGES = ["runs", "ablations", "efficiency", "heatmaps", "samples", "graph"]
TITLES = {"runs": "Runs", "ablations": "Ablations", "efficiency": "Data efficiency", "heatmaps": "Patch heatmaps",
          "samples": "Samples", "graph": "Graph"}


def open_app(store, monkeypatch, page: str = "runs", graph: str | None = None) -> AppTest:
    monkeypatch.setenv("VLPGRAPH_STORE", str(store))
    at = AppTest.from_file(APP, default_timeout=120)
    if graph is not None:
        at.session_state["graph"] = graph
    return goto(at, page)


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py")
    at.run()
    ok(at)
    assert [t.value for t in at.title] == [TITLES[page]]
    return at


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def array(value) -> np.ndarray:
    """A figure array as plotly's JSON ships it: a list, or {"dtype", "bdata" (base64), "shape"}."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return out.reshape([int(n) for n in str(value.get("shape", len(out))).split(",")])
    return np.asarray(value)


def figures(at: AppTest) -> list[go.Figure]:
    """The page's plotly charts, decoded (plotly ships arrays base64-packed)."""
    return [pio.from_json(el.proto.spec) for el in at.get("plotly_chart")]


# st.dataframe elements carry no key in AppTest (their proto id is empty): find them by position
TABLE_INDEX = {"runs_table": 0, "runs_diff": 1, "abl_table": 0, "eff_table": 0, "graph_nodes": 0}


def table(at: AppTest, key: str):
    return at.dataframe[TABLE_INDEX[key]].value


# ------------------------------------------------------------------------------------ empty


def test_empty_store_says_what_to_run_on_every_page(tmp_path, monkeypatch):
    root = tmp_path / "nothing-here"
    at = open_app(root, monkeypatch)
    for page in PAGES:
        goto(at, page)
        assert any("vlpgraph run graphs/smoke.yaml" in i.value for i in at.info), page
        assert not at.dataframe and not at.get("plotly_chart"), page
    assert not root.exists()  # reading creates nothing


def test_a_store_with_only_a_running_run_shows_every_page(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    store.start_run("r1-s0", graph="g", variant="default", seed=0, device="cpu", flat_params={"train.lr": 0.1},
                    params={"graph": "g", "nodes": {"train": {"kind": "trainer", "inputs": {}, "params": {"lr": 0.1}}}})
    store.log_metrics("r1-s0", [dict(step=s, name="loss", value=1.0 / (s + 1)) for s in range(5)], through_step=4)
    at = open_app(store.root, monkeypatch)
    assert table(at, "runs_table")["status"].tolist() == ["running"]
    for page in PAGES[1:]:
        goto(at, page)  # no exception on any page
    assert any("sweep no numeric param" in i.value for i in goto(at, "efficiency").info)
    assert any("No completed run" in i.value for i in goto(at, "ablations").info)
    # a second trial with another lr: a swept param, still no evaluation anywhere
    store.start_run("r2-s0", graph="g", variant="default", seed=0, device="cpu", flat_params={"train.lr": 0.2},
                    params={"graph": "g", "nodes": {}})
    for page in PAGES:
        goto(at, page)
    assert any("no evaluation yet" in i.value for i in goto(at, "efficiency").info)


# ------------------------------------------------------------------------------------ real runs


@pytest.mark.integration
def test_runs_page_filters_modes_and_compare(app_store, monkeypatch):
    at = open_app(app_store, monkeypatch)
    runs = table(at, "runs_table")
    assert len(runs) == 12 and set(runs["graph"]) == {"timix_sweep"}  # the newest graph by default
    assert {"retrieval.rsum", "zeroshot.top1", "shapes.train_fraction"} <= set(runs.columns)
    assert runs["retrieval.rsum"].notna().all()
    [parallel] = figures(at)  # parallel coordinates: swept params, then the metrics shown
    labels = [d["label"] for d in parallel.data[0].dimensions]
    assert labels[0] == "shapes.train_fraction" and "retrieval.rsum" in labels

    at.selectbox(key="graph").set_value("(all graphs)").run()
    ok(at)
    assert len(table(at, "runs_table")) == 13

    at.selectbox(key="graph").set_value("timix_sweep").run()
    at.multiselect(key="runs_variant").set_value(["timix"]).run()
    ok(at)
    timix = table(at, "runs_table")
    assert len(timix) == 4 and set(timix["variant"]) == {"timix"}

    at.radio(key="runs_mode").set_value("best").run()
    ok(at)
    best = table(at, "runs_table")
    assert (best["retrieval.rsum"].to_numpy() >= timix["retrieval.rsum"].to_numpy() - 1e-12).all()
    at.radio(key="runs_mode").set_value("at step").run()
    at.number_input(key="runs_step").set_value(0).run()
    ok(at)
    assert table(at, "runs_table")["retrieval.rsum"].isna().all()  # nothing was evaluated at step 0

    # any column: a filter on a swept param
    at.radio(key="runs_mode").set_value("last").run()
    at.multiselect(key="runs_filter_cols").set_value(["shapes.train_fraction"]).run()
    at.multiselect(key="runs_f_shapes.train_fraction").set_value([0.1, 1.0]).run()
    ok(at)
    picked = table(at, "runs_table")
    assert sorted(picked["shapes.train_fraction"]) == [0.1, 1.0]

    # compare two runs: config diff + overlaid curves
    ids = picked["run_id"].tolist()
    at.multiselect(key="runs_compare").set_value(ids).run()
    ok(at)
    diff = table(at, "runs_diff")
    assert "shapes.train_fraction" in diff.index and "vision.width" not in diff.index
    assert all(len(set(row)) > 1 for row in diff.itertuples(index=False))
    fig = figures(at)[-1]
    assert len(fig["data"]) == 4  # two runs x (faint raw + smoothed)
    at.slider(key="runs_smoothing").set_value(0.0).run()
    fig = figures(at)[-1]
    assert len(fig["data"]) == 2
    # the longer curve (the 10% run takes a single step; the table's order follows the metric)
    steps = max((array(d.x).tolist() for d in fig.data), key=len)
    assert steps == sorted(steps) and len(steps) > 1
    at.selectbox(key="runs_curve").set_value("lr").run()
    ok(at)
    assert figures(at)[-1]["layout"]["title"]["text"] == "lr"


def _capture_downloads(monkeypatch) -> dict[str, bytes]:
    """AppTest keeps download buttons' files in an in-memory store it throws away: keep a copy."""
    files: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def load_and_get_id(self, path_or_data, mimetype, kind, filename=None):
        file_id = original(self, path_or_data, mimetype, kind, filename)
        files[file_id] = path_or_data if isinstance(path_or_data, bytes) else str(path_or_data).encode()
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", load_and_get_id)
    return files


@pytest.mark.integration
def test_ablations_pivot_matches_the_store_and_the_csv_matches_the_table(app_store, monkeypatch):
    files = _capture_downloads(monkeypatch)
    at = open_app(app_store, monkeypatch, "ablations")
    at.selectbox(key="abl_metric").set_value("retrieval.rsum").run()
    ok(at)
    shown = table(at, "abl_table")
    assert list(shown.index) == ["baseline", "cutmix", "timix"]
    assert list(shown.columns) == ["0.1", "0.2", "0.4", "1"]
    # every cell is the run's final-step value (one seed: ± 0, n = 1), straight from the store
    store = Store(app_store)
    for run in store.runs({"graph": "timix_sweep"}):
        [value] = [e["value"] for e in store.evals([run["run_id"]])
                   if e["step"] == run["step"] and e["evaluator"] == "retrieval" and e["metric"] == "rsum"]
        col = f"{run['shapes.train_fraction']:g}"
        assert shown.loc[run["variant"], col] == f"{value:.3f} ± 0.000 (1)"
    url = at.get("download_button")[0].proto.url
    csv = files[url.rsplit("/", 1)[-1].split(".")[0]].decode()
    assert csv == shown.to_csv()

    at.selectbox(key="abl_rows").set_value("seed").run()
    at.selectbox(key="abl_cols").set_value("(none)").run()
    ok(at)
    by_seed = table(at, "abl_table")
    assert list(by_seed.index) == ["0"] and list(by_seed.columns) == ["all"] and by_seed.iloc[0, 0].endswith("(12)")
    at.selectbox(key="abl_metric").set_value("wall_s").run()
    ok(at)
    assert table(at, "abl_table").iloc[0, 0].endswith("(12)")
    assert figures(at)[0]["layout"]["yaxis"]["title"]["text"] == "wall_s"


@pytest.mark.integration
def test_efficiency_page_draws_both_axes_and_the_crossings(app_store, monkeypatch):
    at = open_app(app_store, monkeypatch, "efficiency")
    at.selectbox(key="eff_metric").set_value("retrieval.rsum").run()
    ok(at)
    by_fraction, by_time = figures(at)
    assert by_fraction["layout"]["xaxis"]["title"]["text"] == "shapes.train_fraction"
    assert by_time["layout"]["xaxis"]["title"]["text"] == "training wall time (s)"
    lines = [t["name"] for t in by_fraction["data"] if getattr(t, "mode", None) == "lines+markers"]
    assert lines == ["baseline", "cutmix", "timix"]
    marks = table(at, "eff_table")
    assert marks["variant"].tolist() == ["baseline", "cutmix", "timix"]
    assert marks.iloc[0, 1] == "1.00" or float(marks.iloc[0, 1]) <= 1.0  # the baseline reaches its own value
    top = {r["row"]: r["mean"] for r in analysis.aggregate(
        Store(app_store), "retrieval.rsum", "variant", "shapes.train_fraction", (("graph", "in", ("timix_sweep",)),)
    ).to_dict("records") if r["col"] == 1.0}
    assert by_fraction["layout"]["shapes"][0]["y0"] == pytest.approx(top["baseline"])  # the dashed target line
    at.selectbox(key="eff_baseline").set_value("timix").run()
    ok(at)
    assert figures(at)[0]["layout"]["shapes"][0]["y0"] == pytest.approx(top["timix"])


@pytest.mark.integration
def test_efficiency_page_explains_a_graph_without_a_fraction_sweep(app_store, monkeypatch):
    at = open_app(app_store, monkeypatch, "efficiency", graph="smoke")
    assert any("train_fraction" in i.value for i in at.info)


@pytest.mark.integration
def test_heatmaps_page_sample_side_by_side_opacity_and_mixed(app_store, monkeypatch):
    at = open_app(app_store, monkeypatch, "heatmaps")
    [fig] = figures(at)
    heat = next(t for t in fig["data"] if t.type == "heatmap")
    assert heat.opacity == 0.5 and array(heat.z).shape == (8, 8)
    assert "pointing:" in fig["layout"]["title"]["text"]
    samples = at.selectbox(key="hm_sample").options
    assert len(samples) == 16
    at.selectbox(key="hm_sample").set_value(3).run()  # sample ids 0..15
    at.slider(key="hm_opacity").set_value(0.9).run()
    ok(at)
    [fig] = figures(at)
    assert next(t for t in fig["data"] if t.type == "heatmap").opacity == 0.9
    keys = [f"{r}|{e}" for r, e, k in analysis.patch_runs(Store(app_store), (("graph", "in", ("timix_sweep",)),))
            [["run_id", "evaluator", "kind"]].itertuples(index=False) if k == "heatmap"]
    at.selectbox(key="hm_other").set_value(keys[0]).run()
    ok(at)
    assert len(figures(at)) == 2
    # mixed samples: image, partner, mixed image and λ
    assert len(at.get("image")) == 3
    [lam] = [m for m in at.metric if m.label.startswith("λ")]
    assert 0.0 <= float(lam.value) <= 1.0


@pytest.mark.integration
def test_graph_page_draws_the_run_dag(app_store, monkeypatch):
    at = open_app(app_store, monkeypatch, "graph")
    [fig] = figures(at)
    roles = {t["name"] for t in fig["data"] if getattr(t, "mode", None) == "markers+text"}
    assert {"dataset", "encoder", "objective", "trainer", "evaluator"} <= roles
    nodes = table(at, "graph_nodes")
    assert {"mix", "tpp", "itc", "train", "grounding"} <= set(nodes["node"])  # the newest run: timix
    assert nodes.set_index("node").loc["mix", "role"] == "mixer"
    at.session_state["graph"] = "(all graphs)"
    at.run()
    [smoke] = [r["run_id"] for r in Store(app_store).runs({"graph": "smoke"})]
    at.selectbox(key="graph_run").set_value(smoke).run()
    ok(at)
    assert figures(at)[0]["layout"]["title"]["text"].startswith("smoke / default")
    assert set(table(at, "graph_nodes")["node"]) == {"shapes", "vision", "text", "itc", "train", "retrieval", "zeroshot"}


# ------------------------------------------------------------------------------------ known values


def test_ablation_cells_are_mean_std_n_over_seeds(synthetic_store, monkeypatch):
    at = open_app(synthetic_store, monkeypatch, "ablations")
    shown = table(at, "abl_table")
    values = [syn_rsum("timix", 0.7, s) for s in SYN_SEEDS]
    assert shown.loc["timix", "0.7"] == f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (6)"
    assert list(shown.index) == ["baseline", "timix"]


def test_a_hostile_filter_string_reaches_sql_only_as_a_value(synthetic_store, monkeypatch):
    at = open_app(synthetic_store, monkeypatch)
    assert len(table(at, "runs_table")) == 61
    at.multiselect(key="runs_filter_cols").set_value(["run_id"]).run()  # > 50 values: a text filter
    for hostile in ["x'; DROP TABLE runs; --", "' OR '1'='1", "%' OR 1=1 --"]:
        at.text_input(key="runs_t_run_id").input(hostile).run()
        ok(at)
        assert len(table(at, "runs_table")) == 0
    at.text_input(key="runs_t_run_id").input("timix-0.7").run()
    assert len(table(at, "runs_table")) == len(SYN_SEEDS)
    assert len(Store(synthetic_store).runs()) == 61


# ------------------------------------------------------------------------------------ live sweep


SWEEP = """
sweep:
  grid:
    shapes.train_fraction: [0.25, 0.5, 0.75, 1.0]
"""


@pytest.mark.integration
@pytest.mark.slow
def test_the_app_reads_while_a_sweep_writes(tmp_path, monkeypatch, cli_env):
    graph = tiny_graph(tmp_path, more=SWEEP, train=dict(epochs=2))
    store = tmp_path / "store"
    cli_env["VLPGRAPH_STORE"] = str(store)
    proc = start_run(graph, cli_env, text=True)
    at = open_app(store, monkeypatch)
    seen, reads = [], 0
    while proc.poll() is None:
        at.run()  # the Refresh button does exactly this
        ok(at)
        reads += 1
        if at.dataframe:
            runs = table(at, "runs_table")
            seen.append((len(runs), int((runs["status"] == "completed").sum())))
        time.sleep(0.2)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert "lock" not in err.lower()
    at.run()
    ok(at)
    final = table(at, "runs_table")
    assert len(final) == 4 and (final["status"] == "completed").all() and final["retrieval.rsum"].notna().all()
    assert reads >= 5
    assert seen == sorted(seen)  # runs and completions only ever grow
    assert seen and seen[0][1] < 4  # it read before the sweep had finished


# ------------------------------------------------------------------------------------ the CLI verb


def test_app_verb_binds_localhost_and_refuses_a_busy_port(tmp_path, capsys, monkeypatch):
    import socket

    from vlpgraph import cli

    args = cli.build_parser().parse_args(["app"])
    assert (args.host, args.port) == ("127.0.0.1", 8501)
    command = cli.app_command(tmp_path, args.host, 9999)
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[command.index("--server.port") + 1] == "9999"
    assert command[command.index("run") + 1] == str(ROOT / "app" / "main.py")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(cli.os, "execve", lambda *a: pytest.fail("must not start streamlit"))
        assert main(["app", "--store", str(tmp_path), "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["app", "--port", "70000"]) == 2
    started = []
    monkeypatch.setattr(cli.os, "execve", lambda exe, argv, env: started.append((argv, env)))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["app", "--store", str(tmp_path / "s"), "--port", str(port)]) == 0
    [(argv, env)] = started
    assert env["VLPGRAPH_STORE"] == str((tmp_path / "s").resolve()) and argv[1:3] == ["-m", "streamlit"]


def test_captions_show_as_written_not_as_markdown(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "app"))
    import common

    assert common.plain("a *big* [red](x) circle_") == r"a \*big\* \[red\]\(x\) circle\_"
    assert common.plain(None) == ""
