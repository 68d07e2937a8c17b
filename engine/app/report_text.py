"""Terminal output of previews and runs, as rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from engine.app.preview import Preview
from engine.decide.evaluation import STAGES
from engine.state.delivery import failure_summary

_HEAD = {"segment": "segment", "trigger": "trigger", "consent": "consent", "frequency_cap": "freq cap",
         "cooldown": "cooldown", "holdout": "holdout", "arbitration": "arbitr.", "budget": "budget",
         "offers": "offers"}


def _console() -> Console:
    return Console(width=160, soft_wrap=False, highlight=False)


def print_preview(preview: Preview) -> None:
    console = _console()
    console.print(f"Preview at {preview.as_of}: {preview.customers} customers, "
                  f"{preview.total_offers} offers, estimated cost {preview.total_cost:,.2f}")
    table = Table("campaign", "channel", *[_HEAD[s] for s in STAGES], "cost", "variants")
    for c in preview.campaigns:
        variants = " ".join(f"{k}:{v}" for k, v in c.variants.items())
        table.add_row(f"{c.id}\n{c.name}", c.channel, *[str(c.funnel[s]) for s in STAGES],
                      f"{c.cost:,.2f}", variants)
    console.print(table)
    for c in preview.campaigns:
        for error in c.errors:
            console.print(f"[red]template error[/red] {c.id}: {error}")
        if c.sms_too_long:
            console.print(f"[yellow]{c.id}: {c.sms_too_long} sample SMS longer than allowed[/yellow]")
        for sample in c.samples:
            console.print(f"\n[bold]{c.id}[/bold] -> {sample['customer_id']} ({sample['locale']}, "
                          f"variant {sample['variant'] or '-'}, send at {sample['send_at']}): {sample['reward']}")
            if sample.get("subject"):
                console.print(f"  subject: {sample['subject']}")
            body = (sample.get("body") or "").strip().splitlines()
            for line in body[:6]:
                console.print(f"  | {line}", markup=False)
            if sample.get("why"):
                console.print("  why: " + ", ".join(f"{k}={v}" for k, v in sample["why"].items()), markup=False)
    for warning in preview.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", markup=True)
    if preview.explanation:
        _print_explanation(console, preview.explanation)
    if preview.diff is not None:
        table = Table("campaign", "before", "after", "added", "removed", "examples")
        for row in preview.diff:
            examples = " ".join([f"+{c}" for c in row["added_examples"][:3]] +
                                [f"-{c}" for c in row["removed_examples"][:3]])
            table.add_row(row["campaign"], str(row["before"]), str(row["after"]), str(row["added"]),
                          str(row["removed"]), examples)
        console.print("\nDifference with the other rules:")
        console.print(table)


def _print_explanation(console: Console, explanation: dict) -> None:
    if not explanation.get("found"):
        console.print(f"\nCustomer {explanation['customer_id']} is not in the data.")
        return
    console.print(f"\nCustomer {explanation['customer_id']}: " +
                  ", ".join(f"{k}={v}" for k, v in explanation["features"].items()), markup=False)
    for campaign in explanation["campaigns"]:
        console.print(f"  [bold]{campaign['campaign']}[/bold] ({campaign['name']}): {campaign['outcome']}")
        for condition in campaign["conditions"]:
            console.print(f"      {condition['where']}: `{condition['expression']}` -> {condition['value']}",
                          markup=False)


def print_run(result) -> None:
    console = _console()
    if result.run_id is None:
        console.print(f"Nothing due at {result.as_of}.")
        return
    console.print(f"Run {result.run_id} at {result.as_of}: {result.new_offers} new offers recorded, "
                  f"{result.already_recorded} already recorded, {result.holdouts} held out.")
    table = Table("campaign", *[_HEAD[s] for s in STAGES])
    for campaign, funnel in result.funnels.items():
        table.add_row(campaign, *[str(funnel[s]) for s in STAGES])
    console.print(table)
    for conflict in result.conflicts[:10]:
        console.print(f"[red]conflict[/red]: {conflict['firing_key']} was recorded with a different "
                      "payload (the rules changed since); nothing new sent for it")
    for error in result.render_errors[:10]:
        console.print(f"[red]template error[/red]: {error['error']}", markup=True)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if result.delivery is not None:
        d = result.delivery
        console.print(f"Delivery: sent {d.sent}, failed {d.failed}, skipped {d.skipped}, not yet due {d.not_due}.")
        for line in failure_summary(d.errors):
            console.print(f"[red]delivery failed[/red]: {line}", markup=True, highlight=False)
        if d.failed:
            console.print("Failed offers stay in the outbox; `loyalty deliver` retries them.")
