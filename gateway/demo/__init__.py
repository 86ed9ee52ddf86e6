"""``oauth-gateway demo``: the whole system on one machine, nothing installed beforehand."""
