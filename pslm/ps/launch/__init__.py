"""Starting a cluster: local processes (``local``) or Ray actors (``ray``)."""
