"""The `loyalty` command line: a thin layer over the front door, ``engine.Workspace``.

Exit codes: 0 ok, 1 the rules or data are wrong, 2 bad usage, 3 an outside failure
(delivery, a locked state database).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import shutil
import sys
from pathlib import Path

import click

from engine import LoyaltyError, RuleError, Workspace, __version__, init_example, init_workspace, run_demo
from engine.app.csv_export import csv_safe
from engine.app.points import COLUMNS as POINTS_COLUMNS
from engine.app.points import format_points
from engine.app.report_text import TerminalProgress, display_width, print_preview, print_run, without_escapes
from engine.app.reporting import print_report
from engine.app.simulation import format_text
from engine.decide.evaluation import STAGES
from engine.state.delivery import deferral_summary, failure_summary

workspace_argument = click.argument("workspace", type=click.Path(file_okay=False, path_type=Path),
                                    default=".", required=False)
as_of_option = click.option("--as-of", "as_of", default=None, metavar="TIME",
                            help="The instant evaluated, e.g. 2026-11-23 or 2026-11-23T10:00:00+08:00 (default: now).")


def engine_options(command):
    """--engine, --scheduler and --partitions: where and in how many pieces evaluation runs."""
    command = click.option("--partitions", type=click.IntRange(1, 100_000), default=None,
                           help="Evaluate customers in this many partitions (default: from data size "
                                "and free memory, or engine.execution.partitions in loyalty.yaml).")(command)
    command = click.option("--scheduler", default=None, metavar="ADDRESS",
                           help="With --engine dask: a running scheduler, e.g. tcp://host:8786 "
                                "(default: a cluster started on this machine).")(command)
    return click.option("--engine", type=click.Choice(["local", "dask"]), default=None,
                        help="Where to evaluate (default: engine.kind in loyalty.yaml, else local).")(command)


workers_option = click.option(
    "--workers", type=click.IntRange(1, 256), default=None,
    help="Processes deciding for the customers at once with the local engine (default: engine.workers in "
         "loyalty.yaml, else one per CPU core for large programmes; 1: one process).")


def format_option(*choices: str):
    return click.option("--format", "fmt", type=click.Choice(choices), default=choices[0], show_default=True,
                        help="Output format.")


def handle_errors(command):
    """Turn engine errors into a short message and a fixed exit code, in one place."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RuleError as exc:
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            click.echo(f"{len(exc.problems)} problem(s); run `loyalty validate` for details.", err=True)
            sys.exit(1)
        except LoyaltyError as exc:
            click.echo(without_escapes(f"error: {exc}"), err=True)
            sys.exit(exc.exit_code)
    return wrapper


def _github_escape(text: str, property_value: bool = False) -> str:
    """Escape a GitHub Actions workflow-command value (%, CR, LF; and : , in properties)."""
    text = str(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if property_value:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def _progress_echo(message: str) -> None:
    click.echo(without_escapes(message), err=True)


@contextlib.contextmanager
def progress_display(enabled: bool = True):
    """What long commands report their progress to: a bar redrawn in place on a terminal,
    plain lines otherwise (logs, CI), nothing when the output is for a program (JSON, CSV)."""
    if not enabled:
        yield None
    elif sys.stderr.isatty():
        bar = TerminalProgress(sys.stderr, shutil.get_terminal_size().columns)
        try:
            yield bar
        finally:
            bar.close()
    else:
        yield _progress_echo


def _echo_json(data) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))


@click.group()
@click.version_option(__version__, prog_name="loyalty")
def main():
    """loyalty: rules-driven loyalty and retention campaigns from YAML files."""


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--example", is_flag=True,
              help="The complete example programme (星享会员) with generated sample data instead.")
@click.option("--customers", default=2000, show_default=True, help="With --example: sample customers.")
@handle_errors
def init(directory: Path, example: bool, customers: int):
    """Create a small working workspace in DIRECTORY."""
    created = init_example(directory, customers) if example else init_workspace(directory)
    click.echo(f"Created a workspace in {directory}:")
    for path in created:
        click.echo(f"  {path}")
    click.echo(f"Next: loyalty validate {directory} && loyalty preview {directory}")


@main.command()
@workspace_argument
@format_option("text", "json", "github")
@handle_errors
def validate(workspace: Path, fmt: str):
    """Check every rule file, loyalty.yaml and template; exit 1 on errors."""
    result = Workspace(workspace).validate()
    if fmt == "json":
        _echo_json([p.as_dict() for p in result.problems])
    elif fmt == "github":
        for p in result.problems:
            level = "error" if p.severity == "error" else "warning"
            message = p.message + (f" ({p.hint})" if p.hint else "")
            click.echo(f"::{level} file={_github_escape(p.file, True)},line={p.line},col={p.column}"
                       f"::{_github_escape(message)}")
    else:
        for p in result.problems:
            click.echo(str(p))
            if p.source_line:
                click.echo(f"    {p.source_line}")
                click.echo("    " + " " * display_width(p.source_line[: max(p.column - 1, 0)]) + "^")
        if result.ok:
            click.echo(f"OK: {len(result.files)} files, "
                       f"{len(result.workspace.program.campaigns)} campaigns, "
                       f"{len(result.workspace.program.segments)} segments.")
        else:
            click.echo(f"{len(result.errors)} error(s).")
    sys.exit(0 if result.ok else 1)


@main.command()
@workspace_argument
@as_of_option
@click.option("--campaign", "campaigns", multiple=True, help="Only this campaign (repeatable).")
@click.option("--customer", default=None, help="Explain every stage and condition for this customer id.")
@click.option("--diff", "diff", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Compare with another version of the workspace (e.g. a git worktree).")
@click.option("--sample", default=2, show_default=True, help="Rendered messages shown per campaign.")
@click.option("--since", default=None, help="Event triggers: events since this time (default: the last run).")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every customer's outcome per campaign and the stage that stopped it "
                   "(.parquet, else CSV).")
@engine_options
@workers_option
@format_option("table", "json", "csv")
@handle_errors
def preview(workspace, as_of, campaigns, customer, diff, sample, since, trace_path, engine, scheduler,
            partitions, workers, fmt):
    """Dry run: who would get what, and why. Writes nothing."""
    programme = Workspace(workspace)
    if trace_path is not None:
        programme.check_output(trace_path)       # before the work, not after it
    with progress_display(fmt == "table") as progress:
        result = programme.preview(as_of, campaigns=list(campaigns) or None, customer=customer,
                                   diff=diff, sample=sample, since=since, trace=trace_path is not None,
                                   partitions=partitions, engine=engine, scheduler=scheduler, workers=workers,
                                   progress=progress)
    if trace_path is not None:
        rows = programme.write_trace(result, trace_path)
        click.echo(f"decision trace: {rows} rows written to {trace_path}", err=True)
    if fmt == "json":
        _echo_json(result.as_dict())
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["campaign", "name", "channel", *STAGES, "cost"])
        for c in result.campaigns:
            writer.writerow([csv_safe(c.id), csv_safe(c.name), csv_safe(c.channel),
                             *[c.funnel[s] for s in STAGES], c.cost])
        click.echo(out.getvalue(), nl=False)
    else:
        print_preview(result)


@main.command()
@workspace_argument
@as_of_option
@click.option("--campaign", "campaigns", multiple=True, help="Only this campaign (repeatable).")
@click.option("--due", is_flag=True, help="Only campaigns whose schedule is due since their last run.")
@click.option("--no-deliver", is_flag=True, help="Record the offers without delivering them.")
@click.option("--now", default=None, help="Delivery clock (default: the real time).")
@engine_options
@workers_option
@format_option("text", "json")
@handle_errors
def run(workspace, as_of, campaigns, due, no_deliver, now, engine, scheduler, partitions, workers, fmt):
    """Evaluate, record the offers, and deliver them. Safe to rerun."""
    with progress_display(fmt == "text") as progress:
        result = Workspace(workspace).run(as_of, campaigns=list(campaigns) or None, due=due,
                                          deliver=not no_deliver, now=now, progress=progress,
                                          partitions=partitions, engine=engine, scheduler=scheduler,
                                          workers=workers)
    if fmt == "json":
        _echo_json(result.as_dict())
    else:
        print_run(result)
    if result.render_errors or result.conflicts:
        sys.exit(1)
    if result.delivery is not None and (result.delivery.failed or result.delivery.deferred):
        sys.exit(3)


@main.command()
@workspace_argument
@click.option("--now", default=None, help="Delivery clock (default: the real time).")
@handle_errors
def deliver(workspace, now):
    """Send what is recorded and due; retry failures."""
    result = Workspace(workspace).deliver(now)
    click.echo(f"sent {result.sent}, failed {result.failed}, skipped {result.skipped}, "
               f"not yet due {result.not_due}")
    for line in failure_summary(result.errors):
        click.echo(f"delivery failed: {line}", err=True)
    for line in deferral_summary(result):
        click.echo(f"delivery deferred: {line}", err=True)
    sys.exit(3 if result.failed or result.deferred else 0)


@main.command()
@workspace_argument
@click.option("--customer", required=True, help="The customer id.")
@format_option("table", "json")
@handle_errors
def history(workspace, customer, fmt):
    """Every offer a customer got, and why; firings that wait or expired; and the changes of their tier."""
    rows = Workspace(workspace).history(customer)
    if fmt == "json":
        _echo_json(rows)
        return
    if not rows:
        click.echo(f"No offers recorded for customer {customer}.")
        return
    for row in rows:
        if row.get("kind") == "pending_firing":
            click.echo(without_escapes(_pending_line(row)))
            continue
        if row.get("kind") == "tier_change":
            click.echo(without_escapes(_tier_line(row)))
            continue
        reward = row.get("reward") or {}
        status = row.get("status")
        if row.get("suppressed_reason"):
            status = f"{status} (granted without a message: {row['suppressed_reason'].replace('_', ' ')})"
        click.echo(without_escapes(
            f"{row.get('as_of')}  {row.get('campaign')} ({row.get('campaign_name')})  "
            f"variant {row.get('variant') or '-'}  {reward.get('description', reward.get('kind'))}  "
            f"status {status}  rules {row.get('rule_version')}"))
        if row.get("pending_since"):
            click.echo(without_escapes(f"    waited since {row['pending_since']} "
                                       f"(stopped by {row['pending_reason'].replace('_', ' ')})"))
        why = row.get("explanation") or {}
        if why:
            click.echo(without_escapes("    because " + ", ".join(f"{k}={v}" for k, v in why.items())))


@main.command()
@workspace_argument
@as_of_option
@click.option("--customer", default=None, help="One member's account and ledger lines.")
@format_option("text", "json", "csv")
@handle_errors
def points(workspace, as_of, customer, fmt):
    """Points balances: earned, redeemed, expired and expiring per member; liability."""
    result = Workspace(workspace).points(as_of, customer)
    for warning in result.warnings:
        click.echo(without_escapes(f"warning: {warning}"), err=True)
    if fmt == "json":
        _echo_json(result.as_dict())
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(POINTS_COLUMNS)
        for row in result.members[POINTS_COLUMNS].itertuples(index=False):
            writer.writerow([csv_safe(row[0]), *row[1:]])
        click.echo(out.getvalue(), nl=False)
    else:
        click.echo(without_escapes(format_points(result)))


def _tier_line(row: dict) -> str:
    """A change of a member's stored tier as `loyalty history` prints it."""
    dates = "".join(f", {label} {row[key]}" for key, label in (
        ("review_at", "review"), ("grace_until", "grace until"), ("trial_until", "trial until")) if row.get(key))
    return f"{row['as_of']}  tier {row['from_tier'] or '-'} -> {row['to_tier'] or '-'}  ({row['reason']}{dates})"


def _pending_line(row: dict) -> str:
    """A firing that waits, or waited without an offer, as `loyalty history` prints it."""
    reason = str(row.get("reason") or "").replace("_", " ")
    what = {"pending": f"pending since {row['first_as_of']} (stopped by {reason}), expires {row['expires_at']}",
            "expired": f"expired {row['expires_at']} (first fired {row['first_as_of']}, last stopped by {reason})",
            "held_out": f"held out at {row['updated_as_of']} (pending since {row['first_as_of']})"}
    return f"{row['updated_as_of']}  {row['campaign']}  {row['firing_key']}  " + \
        what.get(row["status"], f"{row['status']} (stopped by {reason})")


@main.command("runs")
@workspace_argument
@click.option("--limit", default=20, show_default=True)
@format_option("table", "json")
@handle_errors
def list_runs(workspace, limit, fmt):
    """List recent runs."""
    rows = Workspace(workspace).runs(limit)
    if fmt == "json":
        _echo_json(rows)
        return
    for row in rows:
        click.echo(f"{row['run_id']}  as_of {row['as_of']}  {row['status']}  {row.get('counts') or ''}")


@main.command()
@workspace_argument
@click.option("--from", "start", default=None, metavar="DATE", help="First day of the period (default: 90 days before --to).")
@click.option("--to", "end", default=None, metavar="DATE", help="Last day of the period (default: the day of the latest order or send).")
@format_option("table", "json")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report with charts to this file.")
@handle_errors
def report(workspace, start, end, fmt, html_path):
    """Campaign results, uplift over holdout and programme KPIs for a period."""
    programme = Workspace(workspace)
    if html_path is not None:
        programme.check_output(html_path)
    result = programme.report(start, end)
    if html_path is not None:
        programme.write_html_report(html_path, report=result)
    if fmt == "json":
        click.echo(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print_report(result)
        if html_path is not None:
            click.echo(f"HTML report written to {html_path}")


@main.command("import-redemptions")
@workspace_argument
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@handle_errors
def import_redemptions_command(workspace, file):
    """Import coupon redemptions from a CSV or Parquet file (code, order_id[, customer_id, amount, redeemed_at])."""
    result = Workspace(workspace).import_redemptions(file)
    click.echo(f"{result.rows} rows read: {result.added} redemptions added, "
               f"{result.duplicates} already recorded, {len(result.bad_rows)} refused.")
    for bad in result.bad_rows[:20]:
        click.echo(without_escapes(f"{file}: row {bad['row']}: {bad['message']}"), err=True)
    if result.bad_rows:
        sys.exit(1)


@main.command("test")
@workspace_argument
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@format_option("text", "json")
@handle_errors
def golden_test(workspace, paths, fmt):
    """Run the workspace's golden tests (tests/*.yaml, or PATHS); exit 1 when one fails."""
    result = Workspace(workspace).test(list(paths) or None)
    if fmt == "json":
        _echo_json(result.as_dict())
    else:
        for failure in result.failed:
            click.echo(f"FAIL {failure}")
        if not result.files:
            click.echo("No golden tests found: add YAML files under tests/ (see docs/testing.md).")
        else:
            click.echo(f"{result.passed} passed, {len(result.failed)} failed "
                       f"({len(result.files)} file(s)).")
    sys.exit(0 if result.ok else 1)


@main.command()
@workspace_argument
@click.option("--from", "start", required=True, metavar="DATE", help="First simulated run, e.g. 2026-12-01 or 2026-12-01T10:00.")
@click.option("--to", "end", required=True, metavar="DATE", help="Last day simulated.")
@click.option("--every", default="1d", show_default=True, help="Time between runs: 1d, 12h, 1w.")
@click.option("--due", is_flag=True, help="Each run takes only the campaigns whose schedule is due, like run --due.")
@click.option("--diff", "diff", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also forecast another version of the workspace and compare.")
@click.option("--fresh", is_flag=True,
              help="Ignore the state database: simulate as if the programme had never run.")
@engine_options
@format_option("text", "json", "csv")
@handle_errors
def simulate(workspace, start, end, every, due, diff, fresh, engine, scheduler, partitions, fmt):
    """Forecast offers and reward cost over a date range, in memory. Writes nothing."""
    with progress_display(fmt == "text") as progress:
        result = Workspace(workspace).simulate(start, end, every, diff, due=due, fresh=fresh, engine=engine,
                                               scheduler=scheduler, partitions=partitions, progress=progress)
    if fmt == "json":
        _echo_json(result.as_dict())
    elif fmt == "csv":
        rows = result.rows()
        out = io.StringIO()
        if rows:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: csv_safe(v) for k, v in row.items()} for row in rows)
        click.echo(out.getvalue(), nl=False)
    else:
        click.echo(format_text(result))


@main.group()
def data():
    """Data preparation for large programmes."""


@data.command("convert")
@workspace_argument
@click.option("--partitions", type=click.IntRange(1, 100_000), default=None,
              help="How many partitions (default: engine.execution.partitions in loyalty.yaml, else from the data size).")
@handle_errors
def data_convert(workspace, partitions):
    """Split the customers, orders and events into partitioned Parquet files (for --engine dask
    and for streamed previews); reruns only when the data changed."""
    with progress_display() as progress:
        folder, count = Workspace(workspace).convert_data(partitions, progress=progress)
    click.echo(f"{count} partitions written to {folder}")


@main.group()
def state():
    """The state database: integrity check and backups."""


@state.command("check")
@workspace_argument
@format_option("text", "json")
@handle_errors
def state_check(workspace, fmt):
    """SQLite's integrity check of the state database (read-only); exit 3 when it is damaged."""
    result = Workspace(workspace).check_state()
    if fmt == "json":
        _echo_json(result.as_dict())
    elif result.ok:
        click.echo(f"OK: {result.path}: schema {result.schema_version}, {result.runs} runs, "
                   f"{result.offers} offers, {result.unfinished_runs} unfinished.")
    else:
        for problem in result.problems[:20]:
            click.echo(f"problem: {problem}", err=True)
    sys.exit(0 if result.ok else 3)


@state.command("backup")
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@workspace_argument
@handle_errors
def state_backup(target, workspace):
    """Copy the state database of WORKSPACE to TARGET (a new file), safely even while a run writes."""
    written = Workspace(workspace).backup_state(target)
    click.echo(f"state database backed up to {written} ({written.stat().st_size:,} bytes, checked)")


@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to build the demo workspace (default: a new temporary folder).")
@click.option("--customers", default=2000, show_default=True, help="How many sample customers.")
@handle_errors
def demo(directory, customers):
    """Sample data + the example programme, end to end."""
    run_demo(directory, customers, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
