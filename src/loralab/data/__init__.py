"""The user's records: reading them, encoding them as token ids with the loss where
it belongs, and batching them.
"""
