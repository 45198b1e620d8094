"""The network layer: stats → guard → mailbox → links → transport, with auth/ beside them."""
