"""The Lightning callback :class:`~memguard.MemGuard`: thin hooks (:mod:`.callback`) that translate a
Lightning run (:mod:`.run`, :mod:`.rank`, :mod:`.batch`) into the guard core (:mod:`memguard.guard`),
which estimates, agrees across ranks, decides, measures and says what it found."""
