"""What the tests share: fake runtimes and backends, raw sockets, real servers started for them."""
