"""The load-test harness: drives a running Gateway and writes what it measured as JSON."""
