"""nn.Modules of the klein stack; no file I/O here."""
