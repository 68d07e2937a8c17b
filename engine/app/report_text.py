"""Terminal output of previews and runs, as rich tables."""

from __future__ import annotations

import re
import unicodedata

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.app.preview import Preview
from engine.decide.evaluation import STAGES
from engine.state.delivery import deferral_summary, failure_summary

_HEAD = {"segment": "segment", "trigger": "trigger", "consent": "consent", "frequency_cap": "freq cap",
         "cooldown": "cooldown", "holdout": "holdout", "arbitration": "arbitr.", "budget": "budget",
         "offers": "offers"}


# ESC/CSI sequences (colours, cursor moves, titles, hyperlinks) and every other control character
# but tab and newline: customer data must not drive the operator's terminal.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]"
                      r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def display_width(text: str) -> int:
    """Terminal columns taken by ``text``: Chinese and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def without_escapes(value) -> str:
    """``value`` as text safe to print on a terminal: escape sequences and control characters
    (but tab and newline) removed."""
    return _ESCAPES.sub("", str(value))


def terminal_text(value) -> str:
    """``without_escapes`` for rich output: rich's ``[markup]`` escaped too, so that customer
    data prints as plain text."""
    return escape(without_escapes(value))


def _console() -> Console:
    return Console(width=160, soft_wrap=False, highlight=False)


def print_preview(preview: Preview, console: Console | None = None) -> None:
    console = console or _console()
    console.print(f"Preview at {preview.as_of}: {preview.customers} customers, "
                  f"{preview.total_offers} offers, estimated cost {preview.total_cost:,.2f}")
    if preview.shown:
        console.print(f"Showing {', '.join(preview.shown)}, decided together with every campaign of the "
                      "programme (arbitration and budgets as in a full run).")
    table = Table("campaign", "channel", *[_HEAD[s] for s in STAGES], "cost", "variants")
    for c in preview.campaigns:
        variants = " ".join(f"{k}:{v}" for k, v in c.variants.items())
        label = c.id if c.name in ("", c.id) else f"{c.id}\n{terminal_text(c.name)}"
        table.add_row(label, c.channel, *[str(c.funnel[s]) for s in STAGES],
                      f"{c.cost:,.2f}", terminal_text(variants))
    console.print(table)
    for c in preview.campaigns:
        if c.pending:
            console.print(f"{c.id}: {c.pending} firing(s) stopped by earlier runs came back (counted from "
                          "segment on)")
        if c.granted_without_message:
            console.print(f"{c.id}: {c.granted_without_message} reward(s) granted without a message "
                          "(no consent or address, or the frequency cap)")
    for c in preview.campaigns:
        for error in c.errors:
            console.print(f"[red]template error[/red] {c.id}: {terminal_text(error)}")
        if c.sms_too_long:
            console.print(f"[yellow]{c.id}: {c.sms_too_long} sample SMS longer than allowed[/yellow]")
        for sample in c.samples:
            console.print(f"\n[bold]{c.id}[/bold] -> {terminal_text(sample['customer_id'])} "
                          f"({terminal_text(sample['locale'])}, variant {terminal_text(sample['variant'] or '-')}, "
                          f"send at {sample['send_at']}): {terminal_text(sample['reward'])}")
            if sample.get("subject"):
                console.print(f"  subject: {terminal_text(sample['subject'])}")
            body = (sample.get("body") or "").strip().splitlines()
            for line in body[:6]:
                console.print(f"  | {terminal_text(line)}")
            if sample.get("why"):
                console.print("  why: " + terminal_text(", ".join(f"{k}={v}" for k, v in sample["why"].items())))
    if preview.tier_moves is not None:
        console.print(tier_moves_line(preview.tier_moves, "Tier moves this run would make"))
    for warning in preview.warnings:
        console.print(f"[yellow]warning:[/yellow] {terminal_text(warning)}")
    if preview.explanation:
        _print_explanation(console, preview.explanation)
    if preview.diff is not None:
        table = Table("campaign", "offers before → after", "cost before → after", "change", "added",
                      "removed", "examples")
        for row in preview.diff:
            examples = " ".join([f"+{c}" for c in row["added_examples"][:3]] +
                                [f"-{c}" for c in row["removed_examples"][:3]])
            table.add_row(row["campaign"], f"{row['before']} → {row['after']}",
                          f"{row['cost_before']:,.2f} → {row['cost_after']:,.2f}", f"{row['cost_change']:+,.2f}",
                          str(row["added"]), str(row["removed"]), terminal_text(examples))
        console.print("\nBefore: the rules given with --diff; after: this workspace's rules.")
        console.print(table)


def _print_explanation(console: Console, explanation: dict) -> None:
    if not explanation.get("found"):
        console.print(f"\nCustomer {terminal_text(explanation['customer_id'])} is not in the data.")
        return
    console.print(f"\nCustomer {terminal_text(explanation['customer_id'])}: " +
                  terminal_text(", ".join(f"{k}={v}" for k, v in explanation["features"].items())))
    for campaign in explanation["campaigns"]:
        note = f"; {campaign['note']}" if campaign.get("note") else ""
        console.print(f"  [bold]{campaign['campaign']}[/bold] ({terminal_text(campaign['name'])}): "
                      f"{terminal_text(campaign['outcome'] + note)}")
        for condition in campaign["conditions"]:
            console.print(f"      {terminal_text(condition['where'])}: `{terminal_text(condition['expression'])}` "
                          f"-> {terminal_text(condition['value'])}")


def tier_moves_line(moves: dict, title: str) -> str:
    """``Tier moves: up gold 3, silver 1; down silver 2; joined bronze 40`` (or none)."""
    parts = [f"{kind} " + ", ".join(f"{terminal_text(name)} {count}" for name, count in found.items())
             for kind, found in moves.items() if found]
    return f"{title}: " + ("; ".join(parts) if parts else "none") + "."


def print_run(result, console: Console | None = None) -> None:
    console = console or _console()
    if result.run_id is None:
        console.print(f"Nothing due at {result.as_of}.")
        return
    console.print(f"Run {result.run_id} at {result.as_of}: {result.new_offers} new offers recorded, "
                  f"{result.already_recorded} already recorded, {result.holdouts} held out.")
    table = Table("campaign", *[_HEAD[s] for s in STAGES])
    for campaign, funnel in result.funnels.items():
        table.add_row(campaign, *[str(funnel[s]) for s in STAGES])
    console.print(table)
    if result.tier_moves:
        console.print(tier_moves_line(result.tier_moves, "Tier moves recorded"))
    for campaign, count in result.reentered.items():
        console.print(f"{campaign}: {count} firing(s) stopped by earlier runs came back")
    if result.pending:
        console.print("Pending firings written: " + ", ".join(f"{n} {s.replace('_', ' ')}"
                                                              for s, n in result.pending.items()))
    for campaign, count in result.granted_without_message.items():
        console.print(f"{campaign}: {count} reward(s) granted without a message")
    for conflict in result.conflicts[:10]:
        console.print(f"[red]conflict[/red]: {conflict['firing_key']} was recorded with a different "
                      "payload (the rules changed since); nothing new sent for it")
    for error in result.render_errors[:10]:
        console.print(f"[red]template error[/red]: {terminal_text(error['error'])}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {terminal_text(warning)}")
    if result.delivery is not None:
        d = result.delivery
        console.print(f"Delivery: sent {d.sent}, failed {d.failed}, skipped {d.skipped}, not yet due {d.not_due}.")
        for line in failure_summary(d.errors):
            console.print(f"[red]delivery failed[/red]: {terminal_text(line)}", highlight=False)
        if d.failed:
            console.print("Failed offers stay in the outbox; `loyalty deliver` retries them.")
        for line in deferral_summary(d):
            console.print(f"[yellow]delivery deferred[/yellow]: {terminal_text(line)}", highlight=False)


_STEP = re.compile(r"(\d[\d,]*)\s*/\s*(\d[\d,]*)")


class TerminalProgress:
    """Progress messages of a long command (``partition 3/8``, ``simulated run 12/31``) as one
    line on a terminal, redrawn in place, with a bar whenever the message says ``k/n``. It
    writes plain text with a carriage return rather than a live display, so a progress bar of
    its own (delivery's) can follow it."""

    WIDTH = 24

    def __init__(self, stream, columns: int = 100):
        self.stream = stream
        self.columns = columns
        self.drawn = False

    def __call__(self, message: str) -> None:
        text = without_escapes(message).replace("\n", " ")
        step = _STEP.search(text)
        if step:
            done, total = (int(n.replace(",", "")) for n in step.groups())
            filled = round(self.WIDTH * min(done, total) / total) if total else self.WIDTH
            text = f"{'█' * filled}{'░' * (self.WIDTH - filled)} {text}"
        else:
            text = f"{'…':<{self.WIDTH}} {text}"
        if display_width(text) > self.columns - 1:
            text = text[: self.columns - 2] + "…"
        self.stream.write("\r" + text + " " * max(0, self.columns - 1 - display_width(text)))
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """End the line, so that what comes next starts on its own."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
