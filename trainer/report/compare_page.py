"""The comparison page: the same prompts, the same seeds, two or more configurations, on one page.

    python -m trainer.report RUN_A RUN_B [RUN_C ...] --out compare.html

Prompts are matched by prompt id (a hash of the prompt's tokens, the same in every run with the
same tokenizer); steps are matched per prompt and per prefix (SFT validation "val", RL samples
"samples") to the nearest sample event of each other run. Because every prompt samples with its
own seed (derived from the run seed and the prompt id), two runs with the same seed and sampling
settings differ only because their models differ; when the settings or seeds differ the page
warns first, since then a different answer is not only the model's doing.

The page, top to bottom (one function below per section): the runs and how far each got, with
the rollbacks and the stop of each (trainer/run_actions.py); the warnings; the curves of every run
overlaid, each run's rollbacks and stop marked on them (labelled with its letter) and the steps
a rollback discarded drawn apart, dashed grey; the prompts where the runs disagree most (first step
where they diverge, how many matched events disagree); then one collapsed section per prompt with
the generations side by side, each other run's text diffed word by word against run A's. One
self-contained file, like the run page (inline CSS/JS from trainer/report/assets, no network).
Samples of steps a rollback discarded are left out of the comparison: each run is compared by
the history it kept.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from trainer.report.charts import ChartActions, svg_chart
from trainer.report.rollbacks import Actions, chart_marks, read_actions, run_actions
from trainer.report.shared import (
    PALETTE, atomic_write, esc, fmt_num, is_finite, metric_series, page_html, preview, read_history, read_metric_branches,
    run_progress, word_diff,
)

SETTING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens")


# --------------------------------------------------------------------------------------------
# Matching the runs


@dataclass
class Run:
    label: str  # "A", "B", ...
    name: str
    metrics: dict[int, dict[str, float]]  # the kept steps (see `read_metric_branches`)
    samples: list[dict]  # without those of steps a rollback discarded
    progress: str
    actions: Optional[Actions] = None
    discarded_samples: int = 0

    def by_prompt(self) -> dict[tuple[str, str], list[dict]]:
        """(prompt_id, prefix) -> its samples in step order."""
        out: dict[tuple[str, str], list[dict]] = {}
        for s in self.samples:
            out.setdefault((s["prompt_id"], str(s.get("prefix", ""))), []).append(s)
        return out


def load_runs(run_dirs: Sequence[Path]) -> list[Run]:
    dirs = [Path(d) for d in run_dirs]
    names = [d.resolve().name for d in dirs]
    if len(set(names)) < len(names):  # e.g. two ".../run": name them by their parent too
        names = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in dirs]
    runs = []
    for i, (d, name) in enumerate(zip(dirs, names)):
        branches, history = read_metric_branches(d), read_history(d)
        samples = sorted((s for s in history.samples if not s.get("discarded")), key=lambda s: (s["step"], s["index"]))
        runs.append(Run(_label(i), name, branches.kept, samples, run_progress(d, branches.kept, samples),
                        read_actions(d, history.rollbacks, branches), len(history.samples) - len(samples)))
    return runs


def _label(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"R{i + 1}"


def _nearest(rows: list[dict], step: int, stage: str) -> dict:
    """The row whose step is nearest `step`; on a tie the one of the same stage (a validation and
    the post-train check can share a step), then the earlier one. Rows sorted by step."""
    steps = [r["step"] for r in rows]
    lo, hi = bisect.bisect_left(steps, step), bisect.bisect_right(steps, step)
    candidates = rows[max(0, lo - 1): hi + 1]
    return min(candidates, key=lambda r: (abs(r["step"] - step), str(r.get("stage", "")) != stage, r["step"]))


def _same(a: dict, b: dict) -> bool:
    return str(a.get("generation", "")).strip() == str(b.get("generation", "")).strip()


@dataclass
class PromptComparison:
    pid: str
    prefix: str
    prompt: str
    reference: Optional[str]
    rows: list[list[dict]]  # per event of run A: [A's sample, the matched sample of B, C, ...]
    first_divergence: Optional[int]  # run A's step of the first event where some run differs
    disagreements: int


def compare_prompts(runs: list[Run]) -> tuple[list[PromptComparison], dict[str, int]]:
    """Prompts (and prefixes) every run sampled, with run A's events as the axis; plus counts of
    the prompts only some runs have."""
    indexed = [r.by_prompt() for r in runs]
    shared = [key for key in indexed[0] if all(key in other for other in indexed[1:])]
    out = []
    for pid, prefix in shared:
        rows = []
        for a in indexed[0][(pid, prefix)]:
            rows.append([a] + [_nearest(other[(pid, prefix)], a["step"], str(a.get("stage", ""))) for other in indexed[1:]])
        differ = [row for row in rows if not all(_same(row[0], other) for other in row[1:])]
        latest = rows[-1][0]
        out.append(PromptComparison(pid, prefix, str(latest.get("prompt", "")), latest.get("reference"), rows,
                                    differ[0][0]["step"] if differ else None, len(differ)))
    every = set().union(*[set(ix) for ix in indexed])
    unshared = {run.label: sum(1 for key in every if key in ix and key not in shared) for run, ix in zip(runs, indexed)}
    return out, unshared


def _settings(sample: dict) -> tuple:
    settings = sample.get("settings") if isinstance(sample.get("settings"), dict) else {}
    return tuple((k, settings.get(k)) for k in SETTING_KEYS)


def _describe(settings: tuple) -> str:
    return ", ".join(f"{k}={fmt_num(v)}" for k, v in settings)


def sampling_warnings(runs: list[Run], prompts: list[PromptComparison]) -> list[str]:
    """Why a difference might not be the model's: other sampling settings, or other seeds."""
    warnings = []
    prefixes = sorted({s.get("prefix", "") for r in runs for s in r.samples})
    for prefix in prefixes:
        per_run = {r.label: sorted({_settings(s) for s in r.samples if s.get("prefix", "") == prefix}) for r in runs}
        if len({tuple(v) for v in per_run.values() if v}) > 1:
            detail = "; ".join(f"{label}: {' | '.join(_describe(x) for x in v)}" for label, v in per_run.items() if v)
            warnings.append(f"sampling settings differ for {prefix!s} samples ({detail}): differences are not only the model's")
    seeds_differ = 0
    for p in prompts:
        seeds = [{(s.get("settings") or {}).get("seed") for s in row} for row in p.rows]
        if any(len(x) > 1 for x in seeds):
            seeds_differ += 1
    if seeds_differ:
        warnings.append(f"sampling seeds differ for {seeds_differ} of {len(prompts)} shared prompts (another trainer.seed?): "
                        f"differences are not only the model's")
    return warnings


# --------------------------------------------------------------------------------------------
# The sections of the page, top to bottom; each returns its lines


def _header(runs: list[Run], warnings: list[str]) -> list[str]:
    lines = ['<header id="header"><h1>Runs compared: ' + " vs ".join(f"<span>{esc(r.label)}</span> {esc(r.name)}" for r in runs) + "</h1>",
             '<ul class="stats" id="runs">']
    for r in runs:
        lines.append(f'<li class="run" data-label="{esc(r.label)}"><b>{esc(r.label)}</b> {esc(r.name)} — {esc(r.progress)}'
                     f'{run_actions(r.label, r.actions, r.discarded_samples)}</li>')
    lines.append("</ul></header>")
    if warnings:
        lines.append('<section id="warnings">' + "".join(f'<p class="warning">⚠ {esc(m)}</p>' for m in warnings) + "</section>")
    else:
        lines.append('<p id="no-warnings" class="meta">Same sampling settings and seeds in every run: differences are the models\'.</p>')
    return lines


def _charts(runs: list[Run]) -> list[str]:
    """The curves of every run overlaid, with each run's rollbacks and stop (labelled with its letter)."""
    marks = ChartActions([], [], {})
    for r in runs:
        chart_marks(r.actions, r.metrics, r.label, f"#actions-{r.label}", into=marks)
    lines = ['<section id="charts"><h2>Curves</h2>']
    reward_names = sorted({k for r in runs for m in r.metrics.values() for k in m if "/reward/" in k or k.endswith("/exact_match")})
    # Task metric means (with mean@k, pass@k, greedy) and lm-eval results, where the runs have them.
    metric_names = sorted({k for r in runs for m in r.metrics.values() for k in m
                           if ("/metric/" in k and "/tag/" not in k) or (k.startswith("eval/") and k != "eval/time_s")})
    for chart_id, title, names in (("cmp-loss", "Loss (train / val)", ["train/loss", "val/loss"]),
                                   ("cmp-rewards", "Rewards and exact match", reward_names),
                                   ("cmp-metrics", "Task metrics and lm-eval", metric_names)):
        # a colour per metric, solid for run A and dashed for the others, so each pair reads at a glance
        series = [(f"{r.label} {n}", pts, PALETTE[m % len(PALETTE)], i > 0) for m, n in enumerate(names)
                  for i, r in enumerate(runs) if (pts := metric_series(r.metrics, n))]
        if series:
            lines.append(f'<div class="chart-box" id="{chart_id}">{svg_chart(chart_id, title, series, (), "value", marks)}</div>')
    lines.append("</section>")
    return lines


def _disagreements(prompts: list[PromptComparison], unshared: dict[str, int], numbers: dict[tuple, int]) -> list[str]:
    """Where the runs disagree most: most disagreeing events first, each linking to its first."""
    ranked = sorted((p for p in prompts if p.disagreements), key=lambda p: (-p.disagreements, p.first_divergence, p.pid))
    lines = [f'<section id="disagreements"><h2>Where the runs disagree most ({len(ranked)} of {len(prompts)} prompts)</h2>']
    if unshared and any(unshared.values()):
        lines.append('<p class="meta" id="unshared">Not in every run (left out): '
                     + ", ".join(f"{esc(k)} {v}" for k, v in unshared.items() if v) + " prompt(s).</p>")
    if ranked:
        lines.append('<table class="events" id="disagree-table"><thead><tr><th>Prompt</th><th>First divergence</th>'
                     '<th>Events that disagree</th></tr></thead><tbody>')
        for p in ranked:
            n = numbers[(p.pid, p.prefix)]
            first_row = next(k for k, row in enumerate(p.rows, start=1) if row[0]["step"] == p.first_divergence)
            lines.append(f'<tr class="disagree-item" data-prompt-id="{esc(p.pid)}" data-first="{p.first_divergence}" data-count="{p.disagreements}">'
                         f'<td><a href="#c{n}-e{first_row}">#{n}</a> <span class="meta">{esc(p.prefix)}</span> {esc(preview(p.prompt, 90))}</td>'
                         f'<td>step {p.first_divergence}</td><td>{p.disagreements} of {len(p.rows)}</td></tr>')
        lines.append("</tbody></table>")
    elif not prompts:
        lines.append('<p class="warning" id="no-shared-prompts">No prompt is in every run: prompt ids come from the prompt\'s tokens, '
                     'so other validation data or another tokenizer share none.</p>')
    else:
        lines.append('<p class="meta" id="no-disagreement">The runs gave the same answers to every shared prompt.</p>')
    lines.append("</section>")
    return lines


def _controls(prompt_count: int) -> str:
    return ('<section id="controls"><input id="prompt-filter" type="search" placeholder="Filter prompts…" aria-label="Filter prompts">'
            '<label><input id="only-disagree" type="checkbox"> only prompts where the runs disagree</label>'
            f'<span id="visible-count">{prompt_count} prompts</span></section>')


def _cell(sample: dict, base: Optional[dict], axis_step: int) -> str:
    sig = sample.get("signals") if isinstance(sample.get("signals"), dict) else {}
    bits = []
    if sample["step"] != axis_step:
        bits.append(f"step {sample['step']}")
    if is_finite(sig.get("exact_match")):
        bits.append(f"EM {fmt_num(sig['exact_match'])}")
    rewards = sample.get("rewards") if isinstance(sample.get("rewards"), dict) else {}
    bits += [f"{k} {fmt_num(v)}" for k, v in rewards.items()]
    gen = str(sample.get("generation", "") or "")
    # run A as is; each other run with its differences from run A's text marked
    text = esc(gen) if base is None else word_diff(str(base.get("generation", "") or ""), gen)
    meta = f'<small class="meta">{esc(" · ".join(bits))}</small>' if bits else ""
    return f'<td><div class="gen">{text}</div>{meta}</td>'


def _side_by_side(p: PromptComparison, n: int, runs: list[Run]) -> list[str]:
    """Prompt #n's collapsed section: the prompt, then one row per event of run A, a column per run."""
    width = f"{90 / len(runs):.1f}%"
    verdict = f'disagree in {p.disagreements}, first at step {p.first_divergence}' if p.disagreements else "same answers"
    lines = [f'<details class="cmp-prompt" id="c{n}" data-prompt-id="{esc(p.pid)}" data-disagree="{p.disagreements}">'
             f'<summary><span class="pnum">#{n}</span><span class="prompt-preview">{esc(preview(p.prompt))}</span>'
             f'<span class="meta">{esc(p.prefix)} · {len(p.rows)} events · {verdict}</span></summary>'
             '<div class="timeline-body"><div class="prompt-full">'
             f'<span class="label">Prompt</span><pre class="prompt-text">{esc(p.prompt)}</pre>'
             f'<span class="label">Reference</span><pre class="reference-text">{esc(p.reference) if p.reference is not None else "–"}</pre></div>'
             '<table class="events side-by-side"><colgroup><col class="c-step">'
             + "".join(f'<col style="width:{width}">' for _ in runs) + "</colgroup><thead><tr><th>Step</th>"
             + "".join(f"<th>{esc(r.label)} {esc(r.name)}</th>" for r in runs) + "</tr></thead><tbody>"]
    for k, row in enumerate(p.rows, start=1):
        agree = all(_same(row[0], other) for other in row[1:])
        lines.append(f'<tr class="event{"" if agree else " disagree"}" id="c{n}-e{k}" data-step="{row[0]["step"]}">'
                     f'<td class="step">{row[0]["step"]}</td>'
                     + "".join(_cell(s, None if i == 0 else row[0], row[0]["step"]) for i, s in enumerate(row)) + "</tr>")
    lines.append("</tbody></table></div></details>")
    return lines


# --------------------------------------------------------------------------------------------
# The page


def render_compare(runs: list[Run]) -> str:
    prompts, unshared = compare_prompts(runs)
    numbers = {(p.pid, p.prefix): n for n, p in enumerate(prompts, start=1)}
    lines = _header(runs, sampling_warnings(runs, prompts))
    lines += _charts(runs)
    lines += _disagreements(prompts, unshared, numbers)
    lines.append(_controls(len(prompts)))
    lines.append(f'<section id="prompts"><h2>Prompts, side by side ({len(prompts)})</h2>')
    for p in prompts:
        lines += _side_by_side(p, numbers[(p.pid, p.prefix)], runs)
    lines.append("</section>")
    title = " vs ".join(r.name for r in runs)
    # the actions' styles only when a run has some, so other pages stay as they were
    css = ("report.css", "compare.css") + (("actions.css",) if any(r.actions or r.discarded_samples for r in runs) else ())
    return page_html(f"Runs compared — {title}", lines, css=css, js=("page.js", "compare.js"))


def write_compare(run_dirs: Sequence[Path], out: Path) -> Path:
    for d in run_dirs:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"{d}: not a directory")
    atomic_write(Path(out), render_compare(load_runs(run_dirs)))
    return Path(out)
