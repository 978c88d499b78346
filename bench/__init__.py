"""The delivery benchmark: the product against an SSE relay, an in-memory long-poll and short polling."""
