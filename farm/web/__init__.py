"""The farm's web dashboard, served by ``farm api`` beside the API: server-rendered pages for the
same people, with the same rules (:mod:`storage.access` decides; another project's job is a
404 page).

One module per concept: :mod:`farm.web.render` (templates, the page route class that turns farm
errors into HTML pages), :mod:`farm.web.sessions` (login by password or token, logout, the
session cookie and the CSRF token every form carries), :mod:`farm.web.jobs_pages` (the jobs
list and a job's page), :mod:`farm.web.farm_pages` (workers and bulk runs). ``templates/`` holds
the Jinja2 templates (autoescaped), ``static/`` the stylesheet and the small scripts that follow
a job live through the API's event stream.
"""
