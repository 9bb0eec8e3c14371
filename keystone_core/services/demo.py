"""Demo data for the embedded dev stack: one organization, factory, robot type and scene."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session, col, select

from keystone_core.models import SOP, Factory, Organization, RobotType, Scene, Skill, Subscene
from keystone_core.services.audit import Actor, record_audit
from keystone_core.simulation.episodes import DEFAULT_TOPICS

DEMO_ORG_SLUG = "demo-robotics"
DEMO_FACTORY_SLUG = "demo-factory"
# What simulated robots register as (`keystone simulate --robot-type`).
DEMO_ROBOT_TYPE_MODEL = "Demo dual-arm"


@dataclass(frozen=True)
class DemoData:
    organization_id: int
    factory_ids: list[int]


def seed_demo(session: Session) -> DemoData:
    """Create the demo rows once; later calls find them and change nothing."""
    org = session.exec(select(Organization).where(Organization.slug == DEMO_ORG_SLUG)).first()
    if org is None:
        org = Organization(name="Demo Robotics", slug=DEMO_ORG_SLUG, description="Demo data")
        session.add(org)
        session.flush()
        factory = Factory(
            organization_id=org.id,  # type: ignore[arg-type]
            name="Demo Factory",
            slug=DEMO_FACTORY_SLUG,
            location="Building 1",
            timezone="Asia/Shanghai",
            production_start="08:00",
            production_end="20:00",
        )
        robot_type = RobotType(
            name="axon-demo-arm",
            model=DEMO_ROBOT_TYPE_MODEL,
            manufacturer="Demo Robotics",
            # What `keystone simulate`'s robots record, so QA's required-topics check
            # passes for them and their episodes can be auto-approved.
            ros_topics=[topic.name for topic in DEFAULT_TOPICS],
        )
        scene = Scene(name="Kitchen tabletop", description="Tabletop manipulation")
        skill = Skill(slug="pick_and_place", description="Pick an object and place it")
        session.add_all([factory, robot_type, scene, skill])
        session.flush()
        session.add(Subscene(scene_id=scene.id, name="Cup to tray"))  # type: ignore[arg-type]
        session.add(
            SOP(
                slug="pick-and-place",
                description="Pick the cup, place it on the tray",
                skill_sequence=["pick_and_place"],
            )
        )
        record_audit(
            session,
            Actor.system("demo-seed"),
            "demo.seed",
            entity_type="organization",
            entity_id=org.id or 0,
            after={"factory": DEMO_FACTORY_SLUG},
        )
    assert org.id is not None
    factory_ids = list(
        session.exec(
            select(Factory.id).where(
                Factory.organization_id == org.id, col(Factory.deleted_at).is_(None)
            )
        )
    )
    return DemoData(organization_id=org.id, factory_ids=[f for f in factory_ids if f is not None])
