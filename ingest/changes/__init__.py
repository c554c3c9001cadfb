"""Where changes since the previous point come from (changed-block tracking, issue 12)."""
