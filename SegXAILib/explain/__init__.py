"""Explanation methods: one interface (:mod:`.base`), one file per method, one registry."""
