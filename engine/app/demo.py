"""`loyalty demo`: sample data + the example programme, end to end, in a workspace.

Generates customers, orders and events offline, copies the example programme,
validates, previews, runs (delivering to JSON Lines files and to an SMTP server on
loopback that the demo starts itself), and reports where everything is.
"""

from __future__ import annotations

import csv
import hashlib
import mailbox
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox

from engine.app.report_text import print_preview, print_run
from engine.app.workspace import Workspace
from engine.data.sampledata import copy_example_programme, write_sample_workspace
from engine.errors import LoyaltyError
from engine.state.store import StateStore

DEMO_AS_OF = "2026-11-23T10:00:00+08:00"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _point_smtp_at(workspace: Path, port: int) -> None:
    settings = workspace / "loyalty.yaml"
    text = settings.read_text(encoding="utf-8")
    text = re.sub(r"port:\s*\d+", f"port: {port}", text)
    text = re.sub(r"host:\s*localhost", "host: 127.0.0.1", text)
    settings.write_text(text, encoding="utf-8")


def build_demo_workspace(directory: Path | None, customers: int) -> Path:
    """Write sample data and copy the example programme into a (new) workspace."""
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="loyalty-demo-"))
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    write_sample_workspace(directory, customers=customers, as_of=DEMO_AS_OF)
    copy_example_programme(directory)      # rules, templates and the golden tests
    return directory


def write_demo_redemptions(workspace: Path, share: float = 0.3) -> Path:
    """Pretend a share of the coupons sent were used: a redemptions file as a shop would export it."""
    with StateStore(workspace / "state" / "loyalty.db") as store:
        codes = store.coupon_codes()
    target = workspace / "data" / "redemptions.csv"
    with target.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["code", "order_id", "customer_id", "amount", "redeemed_at"])
        for row in codes.sort_values("code").itertuples():
            digest = int(hashlib.sha256(row.code.encode()).hexdigest()[:8], 16)
            if digest % 1000 >= share * 1000:
                continue
            when = pd.Timestamp(DEMO_AS_OF) + pd.Timedelta(hours=24 + digest % 200)
            writer.writerow([row.code, f"R{digest % 10**8:08d}", row.customer_id,
                             f"{120 + digest % 600:.2f}", when.isoformat()])
    return target


def run_demo(directory: Path | None, customers: int = 2000,
             echo: Callable[[str], None] = print) -> dict:
    """The whole tour; returns the paths it produced."""
    started = time.perf_counter()
    try:
        workspace = build_demo_workspace(directory, customers)
    except FileExistsError as exc:
        raise LoyaltyError(f"{exc}; give --dir a new or empty folder") from exc
    echo(f"1. Wrote {customers} sample customers, their orders and events, and the example "
         f"programme into {workspace}")

    programme = Workspace(workspace)
    result = programme.validate()
    if not result.ok:
        for problem in result.problems:
            echo(str(problem))
        raise LoyaltyError("the example programme did not validate")
    program = result.workspace.program
    echo(f"2. Validated {len(result.files)} files: {len(program.campaigns)} campaigns, "
         f"{len(program.segments)} segments, {len(program.tiers)} tiers.")
    golden = programme.test()
    for failure in golden.failed:
        echo(f"FAIL {failure}")
    echo(f"   Golden tests (tests/*.yaml, `loyalty test`): {golden.passed} passed, {len(golden.failed)} failed.")

    echo(f"3. Preview at {DEMO_AS_OF} (a dry run, nothing recorded):")
    preview = programme.preview(DEMO_AS_OF, sample=1)
    print_preview(preview)

    received = workspace / "outbox" / "smtp-received"
    received.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    _point_smtp_at(workspace, port)
    controller = Controller(Mailbox(str(received)), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        echo(f"4. Run at {DEMO_AS_OF}, delivering to files and to an SMTP server on 127.0.0.1:{port}:")
        run = programme.run(DEMO_AS_OF, now="2026-11-24T12:00:00+08:00")
        print_run(run)
        rerun = programme.run(DEMO_AS_OF, now="2026-11-24T12:00:00+08:00")
        echo(f"5. Ran again for the same moment: {rerun.new_offers} new offers, "
             f"{rerun.already_recorded} already recorded (nothing is sent twice).")
    finally:
        controller.stop()
    mails = len(mailbox.Maildir(str(received), create=False)) if received.exists() else 0

    redemptions_file = write_demo_redemptions(workspace)
    imported = programme.import_redemptions(redemptions_file)
    echo(f"6. Imported {imported.added} coupon redemptions from {redemptions_file.relative_to(workspace)} "
         f"({imported.duplicates} duplicates ignored, {len(imported.bad_rows)} refused).")

    outputs = {"workspace": workspace, "state": workspace / "state" / "loyalty.db",
               "outbox": sorted(str(p.relative_to(workspace)) for p in (workspace / "outbox").glob("*.jsonl")),
               "emails_received": mails}
    report_path = programme.write_html_report(workspace / "report.html", end="2026-12-23")
    outputs["report"] = report_path
    echo("\nWhere everything is:")
    echo(f"  workspace     {workspace}")
    echo(f"  rules         {workspace / 'rules'}  (edit them, then `loyalty preview {workspace}`)")
    echo(f"  state         {outputs['state']}")
    for name in outputs["outbox"]:
        echo(f"  outbox        {workspace / name}")
    echo(f"  emails        {received} ({mails} received by the demo SMTP server)")
    echo(f"  report        {report_path}")
    echo(f"Done in {time.perf_counter() - started:.1f} s. "
         f"Try: loyalty history {workspace} --customer <id from the outbox>")
    return outputs
