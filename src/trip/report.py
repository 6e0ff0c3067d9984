"""`trip report`: one Markdown report (and optionally an HTML page) that puts run folders side by side:
accuracy tables with the paper's numbers where published, communication, time per round, the figures."""

from __future__ import annotations

import base64
import html
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from trip import multidomain_results
from trip.config import ALL_DOMAINS, load_config
from trip.errors import TripError
from trip.lost_clients import EXPLANATION, report_lines
from trip.outputs import check_writable
from trip.paper import SOURCE, published
from trip.results import BASE2NOVEL_NOTE, SELECTION_RULES, Planned, accuracy_tables, markdown_table, table_rows
from trip.viz import FIGURES_DIR, RunFiles, draw_run_figures

FIGURE_CAPTIONS = {  # file in <run>/figures/ -> caption, in report order
    "accuracy.png": "Accuracy per round: held-out target (top) and mean source validation (bottom)",
    "train_loss.png": "Local training loss per client and round",
    "expert_usage.png": "Expert usage per domain: mean mixture weight and top-expert share",
    "communication.png": "Communication per round",
    "base2novel.png": "Base-to-novel: base, novel and HM accuracy per method (mean ± std over seeds)",
}
# What the tables read of each results.json entry.
RESULT_KEYS = {"method", "target", "seed", "acc", "comm_params_per_round", "comm_bytes_per_round", "rounds", "time_s"}
SHOWN_MISSING = 20  # missing runs named per unfinished run folder


@dataclass
class Run:
    path: Path
    label: str
    files: RunFiles
    planned: Planned  # what its config asks for
    protocol: str = "lodo"  # its config's protocol

    @property
    def in_domain(self) -> bool:
        return self.protocol == "multidomain"

    @property
    def runs(self) -> list[dict]:
        return self.files.results.get("runs", [])

    @property
    def dataset(self) -> str:
        return self.files.results.get("dataset", "")

    @property
    def missing(self) -> list[tuple[str, str, int]]:
        return self.planned.missing(self.runs)

    @property
    def status(self) -> str:
        total = len(self.planned.seeds) * len(self.planned.methods) * len(self.planned.targets)
        return f"unfinished: {total - len(self.missing)} of {total} runs" if self.missing else "finished"


def load_runs(run_dirs: list[Path]) -> list[Run]:
    """Each folder labelled by its name, or by parent/name where two names are the same."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [read_run(Path(d), n if names.count(n) == 1 else "/".join(Path(d).resolve().parts[-2:]))
            for d, n in zip(run_dirs, names)]


def read_run(path: Path, label: str) -> Run:
    """A run folder as its files are, finished or not (a run that finished nothing yet has no results.json)."""
    if not (path / "config.yaml").is_file():
        raise TripError(f"{path} is not a run folder (no config.yaml): pass the --out folder of `trip run` or "
                        f"`trip demo`")
    try:
        cfg = load_config(path / "config.yaml")
    except TripError as err:
        raise TripError(f"run folder {path} is damaged: {err}") from None
    if (path / "results.json").is_file():
        files = RunFiles.read(path)
        _check_entries(files.results, path / "results.json")
    else:
        files = RunFiles({"experiment": cfg.name, "dataset": cfg.data.name, "backbone": cfg.backbone.model_dump(),
                          "runs": []}, [], None)
    return Run(path, label, files, Planned.of(cfg), cfg.protocol)


def _check_entries(results, path: Path) -> None:
    runs = results.get("runs") if isinstance(results, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and RESULT_KEYS <= r.keys() for r in runs):
        raise TripError(f"{path} does not hold trip results (a 'runs' list of entries with "
                        f"{', '.join(sorted(RESULT_KEYS))}): restore it, or leave its run folder out")


def default_out(run_dirs: list[Path]) -> Path:
    """`<first run folder>-report.md` beside that folder: with the runs it reports on, not in whatever folder the
    command ran in, and not inside a run folder, which the report only reads."""
    first = run_dirs[0] if run_dirs[0].name not in ("", "..") else run_dirs[0].resolve()
    return first.parent / f"{first.name}-report.md"


def write_report(run_dirs: list[Path], out: Path, html_page: bool = False) -> list[Path]:
    """Write the Markdown report to `out` (and `out` with suffix .html). A run folder without figures gets them
    drawn into `<out stem>-figures/` beside the report: nothing is written into the run folders."""
    page = out.with_suffix(".html")
    for path in [out, page] if html_page else [out]:
        check_writable(path, "--out", "report.md")
    text = build_report(load_runs(run_dirs), out.parent, out.parent / f"{out.stem}-figures")
    out.write_text(text)
    written = [out]
    if html_page:
        page.write_text(markdown_to_html(text, out.parent, title="TRIP report"))
        written.append(page)
    return written


def build_report(runs: list[Run], report_dir: Path, figures_dir: Path) -> str:
    sections = [_overview(runs, report_dir), _unfinished(runs), _lost_clients(runs), _accuracy(runs),
                _other_selections(runs), _in_domain_accuracy(runs),
                _communication(runs), _timing(runs), _figures(runs, report_dir, figures_dir)]
    return "\n\n".join(s for s in sections if s) + "\n"


def _rel(path: Path, report_dir: Path) -> str:
    return Path(os.path.relpath(path.resolve(), report_dir.resolve())).as_posix()


def _overview(runs: list[Run], report_dir: Path) -> str:
    rows = []
    for run in runs:
        bb = run.files.results.get("backbone", {})
        folder = f"[{run.path.name}]({quote(_rel(run.path, report_dir))})"
        rows.append([run.label, run.files.name, f"`{run.dataset}`", f"`{bb.get('name')}` ({bb.get('pretrained')})",
                     ", ".join(map(str, run.planned.seeds)), ", ".join(run.planned.methods), run.status, folder])
    lines = [f"# TRIP report: {len(runs)} run{'s' * (len(runs) != 1)}", "",
             f"Made by `trip report` on {time.strftime('%Y-%m-%d %H:%M')} from the run folders' files.", "",
             markdown_table(["run", "experiment", "data set", "backbone", "seeds", "methods", "status", "folder"],
                            rows)]
    if any(run.files.results.get("backbone", {}).get("name") == "tiny" for run in runs):
        lines += ["", "Runs on the `tiny` backbone show that the machinery works; their accuracies say nothing "
                  "about TRIP on real benchmarks."]
    return "\n".join(lines)


def _unfinished(runs: list[Run]) -> str:
    """What each unfinished run folder lacks: its config's (method, held-out domain, seed) without a result."""
    lines = []
    for run in runs:
        if missing := run.missing:
            named = [f"{m} {'in-domain' if t == ALL_DOMAINS else f'held out {t}'} (seed {s})"
                     for m, t, s in missing[:SHOWN_MISSING]]
            more = f"; and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
            lines.append(f"- **{run.label}** ({run.status}): missing {'; '.join(named)}{more}")
    if not lines:
        return ""
    return "\n".join(["## Unfinished runs", "",
                      "These folders hold fewer results than their config asks for (seeds × methods × held-out "
                      "domains): continue them with `trip run CONFIG --out FOLDER`. In the tables, a cell over "
                      "fewer seeds than planned says how many it has, and a missing one is \"—\".", "", *lines])


def _lost_clients(runs: list[Run]) -> str:
    """Per run folder, the rounds that lost clients (`trip.lost_clients`), naming each round and its clients."""
    lines = []
    for run in runs:
        if bullets := report_lines(run.files.rounds):
            lines += ["", f"### {run.label}", "", *bullets]
    return "\n".join(["## Rounds that lost clients", "", EXPLANATION, *lines]) if lines else ""


def _accuracy(runs: list[Run]) -> str:
    """One table per (data set, held-out domains), three (base, novel, HM) for base2novel runs; the runs' rows side
    by side, each method's row followed by the paper's numbers where published."""
    groups: dict[tuple, tuple[list[str], list[list[str]]]] = {}
    runs = [run for run in runs if not run.in_domain]  # multidomain folders: `_in_domain_accuracy`
    if not runs:
        return ""
    for run in runs:
        for title, header, rows in accuracy_tables(run.runs, run.dataset, run.planned):
            _, all_rows = groups.setdefault((run.dataset, title, *header), (["run", *header], []))
            all_rows += [[run.label, *row] for row in rows]
    lines = ["## Target accuracy (%)", "",
             "Model selection: source validation. "
             "Accuracy on each held-out domain at the round with the best mean source-validation accuracy "
             "(BMA model for TRIP, server model otherwise); mean ± std over seeds where there are several. "
             "params/round: parameters one client sends per round."]
    if any(published(run.dataset, r["method"]) for run in runs for r in run.runs if "acc_hm" not in r):
        lines[-1] += f" Rows \"(paper)\": {SOURCE}; \"(ours − paper)\": our mean minus the published number."
    if any(title for _, title, *_ in groups):
        lines += ["", BASE2NOVEL_NOTE]
    for (dataset, title, *_), (header, rows) in groups.items():
        lines += ["", f"### Data set `{dataset}`" + (f": {title}" if title else ""), "", markdown_table(header, rows)]
    return "\n".join(lines)


def _other_selections(runs: list[Run]) -> str:
    """The same runs under the other two selection rules, each table labelled with its rule; run folders made
    before the rules were recorded are left out."""
    lines = []
    for key, rule in list(SELECTION_RULES.items())[1:]:
        for run in (run for run in runs if not run.in_domain):
            entries = [r for r in run.runs if r.get(key) is not None]
            if entries:
                header, rows = table_rows(entries, planned=run.planned, key=key)
                lines += ["", f"### {rule}: `{run.label}` (data set `{run.dataset}`)", "",
                          markdown_table(header, [[f"{row[0]} ({rule})", *row[1:]] for row in rows])]
    if not lines:
        return ""
    return "\n".join(["## Target accuracy (%) under other model-selection rules", "",
                      "Not the headline numbers (those select by source validation, above). \"last round\": the "
                      "final round's model. \"test-selected (oracle)\": the round with the best accuracy on the "
                      "held-out domain itself, which looks at the test set; an upper bound, never a result. For a "
                      "base2novel run the accuracy is the HM of base and novel (results.json holds each part's "
                      "too, e.g. `acc_novel_last`).", *lines])


def _in_domain_accuracy(runs: list[Run]) -> str:
    """Multidomain run folders: per run folder, methods × (domains + mean) for the deployed and the personalised
    models at the selected round, then the deployed model's last-round and test-selected numbers."""
    lines = []
    for run in (run for run in runs if run.in_domain):
        domains = [d for d in dict.fromkeys(d for r in run.runs for d in r.get("domains", {}))]
        lines += ["", f"### `{run.label}` (data set `{run.dataset}`)",
                  *multidomain_results.tables(run.runs, domains, run.planned.methods, list(multidomain_results.TABLES),
                                              len(run.planned.seeds), heading="####")]
    if not lines:
        return ""
    return "\n".join(["## In-domain test accuracy (%) (protocol multidomain)", "",
                      "Every domain is a client and is tested on its own held-out test split. Per domain and their "
                      "mean, at the round with the best mean validation accuracy over the clients (BMA model for "
                      "TRIP, server model otherwise), mean ± std over seeds; a domain's personalised accuracy is the "
                      "mean over its clients. The last-round and test-selected (oracle) tables are not results.",
                      *lines])


def _human_bytes(n: float) -> str:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _communication(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        for method in dict.fromkeys(r["method"] for r in run.runs):
            mine = [r for r in run.runs if r["method"] == method]
            first = mine[0]
            clients = len(first.get("clients", []))
            per_round = 2 * clients * first["comm_bytes_per_round"]
            total = statistics.fmean(2 * len(r.get("clients", [])) * r["comm_bytes_per_round"] * r["rounds"]
                                     for r in mine)
            rows.append([run.label, method, f"{first['comm_params_per_round']:,}",
                         _human_bytes(first["comm_bytes_per_round"]), str(clients), _human_bytes(per_round),
                         str(max(r["rounds"] for r in mine)), _human_bytes(total)])
    header = ["run", "method", "params/round (one client)", "upload/round (one client, fp32)", "clients",
              "traffic/round (all clients, up + down)", "rounds", "traffic per training run"]
    return "\n".join(["## Communication", "", "Only the communicated tensors travel, in fp32; the server sends "
                      "each client as much as it receives from it.", "", markdown_table(header, rows)])


def _timing(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        for method in dict.fromkeys(r["method"] for r in run.runs):
            per_round = [r["time_s"] for r in run.files.rounds if r["method"] == method and "time_s" in r]
            totals = [r["time_s"] for r in run.runs if r["method"] == method]
            rows.append([run.label, method, str(len(totals)),
                         f"{statistics.fmean(per_round):.2f}" if per_round else "—",
                         f"{statistics.fmean(totals):.1f}", f"{sum(totals):.1f}"])
    header = ["run", "method", "training runs (target × seed)", "mean time/round (s)", "mean time/training run (s)",
              "total (s)"]
    return "\n".join(["## Time", "", "A round's time covers the clients' local training, aggregation and the "
                      "evaluation of every model on the source-validation splits and the target.", "",
                      markdown_table(header, rows)])


def _run_figures(run: Run, figures_dir: Path) -> list[Path]:
    """The run folder's own figures, or ones drawn from its files into `figures_dir` (never into the folder)."""
    found = sorted((run.path / FIGURES_DIR).glob("*.png")) or \
        draw_run_figures(run.files, figures_dir / re.sub(r"[^\w.-]+", "_", run.label))
    order = list(FIGURE_CAPTIONS)
    return sorted(found, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))


def _figures(runs: list[Run], report_dir: Path, figures_dir: Path) -> str:
    lines = ["## Figures"]
    for run in runs:
        lines += ["", f"### {run.label}"]
        for fig in _run_figures(run, figures_dir):
            caption = FIGURE_CAPTIONS.get(fig.name, fig.stem.replace("_", " "))
            lines += ["", f"![{caption} ({run.label})]({quote(_rel(fig, report_dir))})"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- a tiny Markdown -> HTML converter
# Enough for what build_report writes: headings, pipe tables, image lines, "- " lists, paragraphs, and inline
# `code`, **bold** and [links](url). Images are embedded as data URIs, so the page stands alone.

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")
_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
           (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
           (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>')]
_NUMERIC = re.compile(r"^[−+\-]?[\d,.]+( ± [\d.]+)?( ?[kMG]?B|M)?$")
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; }}
th {{ background: #eee; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
</style></head>
<body>
{body}
</body></html>
"""


def markdown_to_html(markdown: str, base: Path, title: str = "report") -> str:
    """HTML page of `markdown`; image paths are resolved against `base` and embedded."""
    body = "\n".join(_render(kind, lines, base) for kind, lines in _blocks(markdown.splitlines()))
    return _PAGE.format(title=html.escape(title), body=body)


def _kind(line: str) -> str:
    s = line.strip()
    if not s:
        return "blank"
    if s.startswith("#"):
        return "heading"
    if s.startswith("|"):
        return "table"
    if _IMAGE.match(s):
        return "image"
    return "list" if s.startswith("- ") else "para"


def _blocks(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Runs of lines of one kind (tables, lists and paragraphs continue over lines; blank lines separate)."""
    blocks: list[tuple[str, list[str]]] = []
    for line in lines:
        kind = _kind(line)
        if blocks and kind == blocks[-1][0] and kind in ("table", "list", "para"):
            blocks[-1][1].append(line.strip())
        else:
            blocks.append((kind, [line.strip()]))
    return [b for b in blocks if b[0] != "blank"]


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def _render(kind: str, lines: list[str], base: Path) -> str:
    if kind == "heading":
        level = min(6, len(lines[0]) - len(lines[0].lstrip("#")))
        return f"<h{level}>{_inline(lines[0].lstrip('#').strip())}</h{level}>"
    if kind == "table":
        return _table(lines)
    if kind == "image":
        m = _IMAGE.match(lines[0])
        alt = html.escape(m["alt"])
        return (f'<figure><img src="{_image_src(m["src"], base)}" alt="{alt}">'
                f"<figcaption>{_inline(m['alt'])}</figcaption></figure>")
    if kind == "list":
        return "<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines) + "</ul>"
    return f"<p>{_inline(' '.join(lines))}</p>"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    rows = [_cells(x) for x in lines if not re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*", x)]
    head, *body = rows
    out = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    for row in body:
        cells = "".join(f'<td class="num">{_inline(c)}</td>' if _NUMERIC.match(c) else f"<td>{_inline(c)}</td>"
                        for c in row)
        out.append(f"<tr>{cells}</tr>")
    return "\n".join([*out, "</table>"])


def _image_src(src: str, base: Path) -> str:
    path = base / unquote(src)
    if path.suffix.lower() == ".png" and path.is_file():
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return html.escape(src)
