"""Which campaigns are due: a campaign with a cron ``schedule`` runs once per tick."""

from __future__ import annotations

from typing import Callable

import pandas as pd
from croniter import croniter

from engine.config.model import LoadedWorkspace


def due_campaigns(workspace: LoadedWorkspace, last_run: Callable[[str], str | None],
                  as_of: pd.Timestamp) -> list[str]:
    """Campaigns whose cron schedule had a tick since their last run (once, however many ticks).

    ``last_run(campaign_id)`` gives when the campaign last ran on schedule (the state store's,
    or a simulation's in memory). Campaigns without a schedule are due at every run."""
    due = []
    local = as_of.tz_convert(workspace.settings.timezone)
    for campaign in workspace.program.campaigns.values():
        if not campaign.enabled:
            continue
        if campaign.schedule is None:
            due.append(campaign.id)
            continue
        # a tick exactly at as_of counts as due: look back from just after it
        start = (local + pd.Timedelta(seconds=1)).to_pydatetime()
        last_tick = pd.Timestamp(croniter(campaign.schedule, start).get_prev(pd.Timestamp))
        previous = last_run(campaign.id)
        if previous is None or pd.Timestamp(previous) < last_tick:
            due.append(campaign.id)
    return due
