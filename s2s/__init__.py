"""The `s2s` command line, and only that: the top layer, which nothing imports.

Configuration and labels live in core/, the work in tasks/, its orchestration in flows/, the
tensors in models/ and the server in serving/.
"""
