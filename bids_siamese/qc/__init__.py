

#: Header checks that are information, never a problem: oblique acquisitions are normal (shown in the
#: report and recorded, but they never make a scan "CHECK" or fail the usable-scan gate).
INFORMATIONAL_CHECKS = frozenset({"obliquity"})
