"""What every cachemesh service uses: config, server bootstrap, telemetry, auth, prompt model."""
