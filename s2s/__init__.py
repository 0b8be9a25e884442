"""Telugu S2S pipeline: shared configuration, labels and the `s2s` command line.

The work lives in tasks/, its orchestration in flows/, the tensors in models/ and the server in
serving/; this package only holds what all of them share.
"""
