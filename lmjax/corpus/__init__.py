"""Offline corpus preparation (`lmjax data prepare`, `lmjax chat-data`): read, clean, dedup, shard."""
