"""Durable asynchronous transcription: the job store (SQLite), the lane that runs jobs, their signed webhooks."""
