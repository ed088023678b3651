# nbgrader course layout for minildm: solutions/ holds the source notebooks (the single source of
# truth), exercises/ is what `nbgrader generate_assignment` releases from them.
c = get_config()  # noqa: F821 (nbgrader provides get_config)
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"
c.CourseDirectory.db_url = "sqlite:///gradebook.db"
c.Exchange.root = "/tmp/minildm-exchange"
