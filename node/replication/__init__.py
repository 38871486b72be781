"""Everything of a node that spans regions: the transfer engine
(``transfer``), the backlog (``plan``), the background replicator
(``worker``), the reclaimer (``reclaim``) and their wiring (``service``)."""
