"""aiohttp server and client: links, mailbox, connection guard, authentication."""
