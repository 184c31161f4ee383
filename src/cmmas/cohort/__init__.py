"""Cohorts: a manifest of scans segmented by one bundle, resumable, sharded, failures recorded
(:mod:`cmmas.cohort.manifest`, :mod:`cmmas.cohort.batch`)."""
