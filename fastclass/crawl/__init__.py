"""Crawling the web: options and class lists, one guarded fetch, engines, the crawler, jobs and the queue."""
