"""Operations: settings, metrics, logs, thread priority, the container probe."""
