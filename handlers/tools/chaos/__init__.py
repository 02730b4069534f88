"""``jetpool chaos``, by concept: the chaos shop (:mod:`.shop`), its producer (:mod:`.producer`), reading
back what happened (:mod:`.facts`), a scenario's session and row (:mod:`.session`), the scenarios
(:mod:`.scenarios`) and running them (:mod:`.run`)."""
