"""Moved: the ``cache-teacher`` config and command function live in :mod:`lmdistill.teachers.cache.command`; this
module keeps the old import path working."""

from lmdistill.teachers.cache.command import CacheSettings, CacheTeacherConfig, CacheTeacherModel, build_teacher_cache

__all__ = ["CacheSettings", "CacheTeacherConfig", "CacheTeacherModel", "build_teacher_cache"]
