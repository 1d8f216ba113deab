"""The Lightning callback :class:`~memguard.MemGuard`: thin hooks (:mod:`.callback`) over what it reads
from a run (:mod:`.run`), one rank's estimate (:mod:`.rank`), a pure decision shared by every rank
(:mod:`.decision`) and what it says (:mod:`.messages`)."""
