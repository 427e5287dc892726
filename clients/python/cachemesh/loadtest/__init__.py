"""The load-test harness: workloads, closed and open loops over one or several processes,
latency percentiles per layer, cost per layer, a JSON report (SCHEMA.md) and an HTML chart."""
