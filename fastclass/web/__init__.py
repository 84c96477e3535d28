"""`fastclass serve`: the review gallery, a web layer over the same services `clean` uses (no logic here)."""
