"""The bottom layer every other layer uses: configuration and the audit database models."""
