from services.common.stop_signals import hold_stop_signals

hold_stop_signals()  # a SIGTERM during the start-up waits for the drain's handlers (run_main)

from services.prefix_cache.app import main  # noqa: E402 (after the signals are held)

main()
