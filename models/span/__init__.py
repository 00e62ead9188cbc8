"""Span-level routing: switch between the transformer and the hybrid inside one answer.

- :mod:`models.span.gates`: the gates (which model predicts the next token), in a registry.
- :mod:`models.span.decoder`: the span decoder, a composite backend over two backends.
"""
