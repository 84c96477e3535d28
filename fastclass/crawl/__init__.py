"""Crawling the web: options and class lists, one guarded fetch, engines, the crawler, jobs and the queue."""

LICENSES = ("any", "public", "share", "share-commercial", "modify", "modify-commercial")
"""--license: public domain; free to share and use; ... commercially; free to modify, share and use; ... commercially."""

CANARY_QUERY = "red fox"
"""The query `engines check` sends when none is given: common, harmless, with plenty of photos."""
