"""JupyterHub for one machine (docker/compose.yaml): DockerSpawner + NativeAuthenticator."""
import os

c = get_config()  # noqa: F821  (provided by JupyterHub)

c.JupyterHub.spawner_class = "dockerspawner.DockerSpawner"
c.DockerSpawner.image = os.environ.get("LLMLAB_IMAGE", "llmlab/course-cpu:0.1.0")
c.DockerSpawner.network_name = os.environ.get("DOCKER_NETWORK_NAME", "llmlab")
c.DockerSpawner.remove = True
c.DockerSpawner.default_url = "/lab/tree/labs"
# one private volume per user: students never see each other's work
c.DockerSpawner.volumes = {"llmlab-user-{username}": "/home/jovyan"}
c.DockerSpawner.environment = {"LLMLAB_HOME": "/opt/llmlab-assets", "LLMLAB_WORK": "/home/jovyan/work"}
c.DockerSpawner.cmd = ["sh", "-c", "test -d labs || cp -r /opt/llmlab/labs labs; exec jupyterhub-singleuser"]
c.DockerSpawner.mem_limit = "8G"
c.DockerSpawner.cpu_limit = 2.0

c.JupyterHub.hub_ip = "0.0.0.0"
c.JupyterHub.db_url = "sqlite:////srv/jupyterhub/data/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "/srv/jupyterhub/data/jupyterhub_cookie_secret"

c.JupyterHub.authenticator_class = "nativeauthenticator.NativeAuthenticator"
c.Authenticator.admin_users = {"instructor"}  # grades with `llmlab grade` / the formgrader
c.NativeAuthenticator.open_signup = False  # the instructor approves sign-ups
